"""The one place that knows about devices and processes: precision, accumulation, DeepSpeed's
"auto" values, and agreement between ranks."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from fer_dist.config import Config, ConfigError


def choose_precision(asked: str, capability: tuple[int, int] | None) -> str:
    """`auto`: bf16 on GPUs that compute in it (Ampere, compute capability 8.0, and later), fp32
    everywhere else (CPU; Pascal GPUs such as the GTX 1080 Ti, which have no fast half precision
    for training). fp16 is never chosen unless asked, and needs a GPU for its loss scaler."""
    if asked == "fp16" and capability is None:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (its loss scaler); on CPU use bf16 or no")
    if asked != "auto":
        return asked
    return "bf16" if capability is not None and capability >= (8, 0) else "no"


def accumulation_steps(effective: int, micro: int, world: int) -> int:
    """Micro-batches per optimiser step so that micro x steps x world = effective."""
    if not effective:
        return 1
    steps, rest = divmod(effective, micro * world)
    if rest or not steps:
        raise ConfigError(
            f"train.effective_batch_size={effective} is not a multiple of data.batch_size x processes "
            f"= {micro} x {world}; use e.g. {max(1, round(effective / (micro * world))) * micro * world}"
        )
    return steps


def make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for whatever `accelerate launch` started. CPU processes talk over gloo when no
    GPU is present (`--multi_gpu --num_processes N` on CPU gives N ranks); DeepSpeed brings its own
    CPU accelerator, which `cpu=True` would switch off."""
    if cfg.data.decode == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu decodes crops with nvJPEG on a CUDA GPU, and there is none here; use cpu")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed
    world = PartialState(cpu=cpu).num_processes
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=choose_precision(cfg.train.mixed_precision, capability),
        gradient_accumulation_steps=accumulation_steps(cfg.train.effective_batch_size, cfg.data.batch_size, world),
        dynamo_backend="inductor" if cfg.train.compile else "no",  # torch.compile in prepare()
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # the DeepSpeed JSON may leave these to the experiment config
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.optim.grad_clip
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def first_raised(accelerator: Accelerator, value: int) -> tuple[int, int] | None:
    """(rank, value) of the first rank whose `value` is not 0, the same answer on every rank, so
    all ranks act at the same step; None when every rank has 0."""
    values = torch.tensor([value], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.gather(values)
    raised = [(rank, int(v)) for rank, v in enumerate(values.tolist()) if v]
    return raised[0] if raised else None
