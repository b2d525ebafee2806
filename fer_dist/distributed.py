"""The one place that knows about devices and processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs


def make_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator for whatever `accelerate launch` started: CPU processes talk over gloo when
    no GPU is present (`--multi_gpu --num_processes N` on CPU gives N ranks)."""
    cpu = not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision="no" if cpu else mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
