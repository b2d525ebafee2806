"""Training and scoring: the loop, its state and checkpoints, the task between batch and model, evaluation."""
