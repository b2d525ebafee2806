"""Where a training run is: the loop's whole state, saved as `state.json` in every step checkpoint.

Together with the weights, optimiser, schedule and each rank's RNG, this is all a killed run
needs to go on as if it had never stopped, down to the stream's position inside an epoch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    micro_step: int = 0  # micro-batches of the current epoch done (each rank)
    global_step: int = 0  # optimiser steps done
    best: float = -1.0  # best held-out macro-F1 so far
    loss_sum: float = 0.0  # the current epoch's summed micro-batch losses
    losses: int = 0  # ... and how many
    seen: int = 0  # the current epoch's training frames, over all ranks
    train_time: float = 0.0  # seconds the current epoch trained before the checkpoint
    stream: list[int] | None = None  # the epoch's stream totals over all ranks at the checkpoint (counts.Epoch)
    world: int = 1  # processes that wrote it; a resume needs as many

    def new_epoch(self) -> None:
        self.micro_step, self.loss_sum, self.losses, self.seen, self.train_time = 0, 0.0, 0, 0, 0.0
        self.stream = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))
