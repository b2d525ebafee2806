"""What runs produce, combined: ensembles of fold models, post-processing, challenge submissions."""
