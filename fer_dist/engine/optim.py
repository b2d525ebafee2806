"""What is trained and how fast: the optimiser with its weight-decay groups, the learning-rate
schedule, and the model's starting point (weights of earlier stages, frozen parts, gradient
checkpointing, memory layout)."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from fer_dist import config as config_lib
from fer_dist.console import console


def make_optimizer(cfg: config_lib.OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused: one kernel per step on CPU and GPU (on a CPU, a quarter of the time of the per-list
    `foreach` kernels), which also applies the gradient clip (`clip_gradients`)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},  # biases and norms
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def lr_factor(cfg: config_lib.OptimConfig, total_steps: int, steps_per_epoch: int):
    """The learning rate's multiplier at each optimiser step: linear warm-up, then a cosine decay to
    `min_lr_ratio` over the rest of the run, or (`restarts`) cosine cycles of `restart_epochs`
    epochs, each `restart_mult` times longer than the last, that restart from the full rate."""
    warmup = int(cfg.warmup_fraction * total_steps)

    def cosine(progress: float) -> float:
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = step - warmup
        if cfg.schedule == "cosine":
            return cosine(t / max(1, total_steps - warmup))
        cycle = max(1, round(cfg.restart_epochs * steps_per_epoch))
        while t >= cycle:
            t, cycle = t - cycle, cycle * cfg.restart_mult
        return cosine(t / cycle)

    return factor


def initialise(model: torch.nn.Module, cfg: config_lib.TrainConfig) -> None:
    """Weights of earlier stages (`init_from`), frozen parts, and backbone gradient checkpointing."""
    own = model.state_dict()
    for path in cfg.init_from:
        weights = load_file(path)
        misfits = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
        if misfits:
            raise config_lib.ConfigError(
                f"train.init_from {path}: {len(misfits)} of its tensors do not fit this model (first: {misfits[0]})"
            )
        model.load_state_dict(weights, strict=False)
        console.print(f"initialised {len(weights)} tensors from {path}")
    for prefix in cfg.freeze:
        params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        if not params:
            raise config_lib.ConfigError(f"train.freeze: no parameter name starts with {prefix!r}")
        for p in params:
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        backbones = [m for m in model.modules() if m is not model and hasattr(m, "set_grad_checkpointing")]
        if not backbones:
            raise config_lib.ConfigError("train.gradient_checkpointing: this model has no timm backbone")
        for m in backbones:
            m.set_grad_checkpointing(True)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)


def clip_gradients(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float
) -> None:
    """The global-norm clip of the gradients at `max_norm`, for the next optimiser step. DeepSpeed's
    engine clips by its own config. Otherwise the norm is taken over the gradients of the
    optimiser's parameters (the norm torch's `get_total_norm` gives, computed on a CPU in float32 as
    the root of each gradient's dot product with itself summed, elsewhere in one list kernel where
    they share a device and dtype), and the scaling is left to the fused step, which divides each
    gradient by `grad_scale` as it reads it (the attribute torch's GradScaler sets): no second pass
    over the gradients. On a CPU a step whose norm is within `max_norm` is given no scale at all
    (dividing by 1 changes no bit, so the weights move exactly as with the scale). Under fp16 loss
    scaling the GradScaler owns that attribute, so the gradients are unscaled and scaled here.
    Raises nothing of its own: a norm that is not finite scales the step as in torch's clip."""
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    # the optimiser's parameters are the trained ones: walking the model's modules for them cost
    # more than the norm itself (0.8 ms a step for the CPU config)
    trained = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
    if not trained:
        return
    accelerator.unscale_gradients()  # fp16 only
    grads = [p.grad for p in trained]
    kinds = {(g.device.type, g.dtype) for g in grads}
    if kinds == {("cpu", torch.float32)}:  # never empty: `trained` holds a gradient
        # each gradient's sum of squares as a dot product: after torch's norm kernels the step's
        # writing the scaled gradients back cost 3 ms more a step for the CPU config, after dot
        # products nothing more (docs/performance.md, Training step)
        flat = [g.flatten() for g in grads]  # views, unless a gradient is not contiguous
        total = torch.stack([torch.dot(f, f) for f in flat]).sum().sqrt()
    elif len(kinds) == 1:
        # one list kernel and one reduction: get_total_norm's grouping and moving of each norm
        # cost 0.2 ms a step for the CPU config
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    else:
        total = torch.nn.utils.get_total_norm(grads)
    if accelerator.scaler is None and inner.defaults.get("fused"):
        if total.device.type == "cpu":
            # the norm's value is at hand (no device to wait for), and a step within the bound leaves
            # the gradients as they are: a scale, even of 1, has the step write every gradient back.
            # A norm that is not finite (inf, NaN) still becomes the scale, as in torch's clip.
            inner.grad_scale = None if total <= max_norm else total / max_norm
        else:
            inner.grad_scale = torch.clamp(total / max_norm, min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(trained, max_norm, total)
