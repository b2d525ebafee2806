"""`fer-dist bench step`: seconds per training step of fer-dist's loop against a bare PyTorch loop
on the same model and in-memory batches; throughput with 1 and 2 processes (launch/cpu.yaml); and
the memory one training step of the paper's Swin-Tiny fusion model needs, per sample."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from fer_dist.bench.common import child, run_measured
from fer_dist.console import print_table


def step_setup(config_path: str, batch_size: int, world: int = 1):
    """The configured model and four fixed batches of random inputs, on `world`'s share of this
    machine's cores."""
    import torch

    from fer_dist import config
    from fer_dist.models import build

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = config.load(config_path, [f"data.batch_size={batch_size}", "model.pretrained=false"])
    torch.manual_seed(0)
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
    g = torch.Generator().manual_seed(0)
    size, audio = cfg.data.image_size, cfg.data.audio_size
    batches = [
        (
            {
                "image": torch.randn(batch_size, 3, size, size, generator=g),
                "audio": torch.randn(batch_size, 1, *audio, generator=g),
            },
            torch.randint(0, 8, (batch_size,), generator=g),
        )
        for _ in range(4)
    ]
    return cfg, model, batches


def time_steps(config_path: str, batch_size: int, steps: int, warmup: int, bare: bool) -> dict:
    """Seconds per step of fer-dist's step (Accelerate-prepared model and optimiser, accumulation
    context, autocast, gradient clipping, schedule, the loss kept on the device, the per-step
    agreement between ranks on a stop signal), of the same without clipping, and, with `bare`, of
    a bare loop: forward, loss, backward, optimiser step. Each has its own copy of the model; they
    alternate in blocks of 5 steps, so that the machine's drift falls on all alike."""
    import copy

    import torch

    from fer_dist.engine.checkpoint import stop_requested
    from fer_dist.engine.distributed import first_raised, make_accelerator
    from fer_dist.engine.losses import objective
    from fer_dist.engine.optim import lr_factor, make_optimizer
    from fer_dist.engine.task import Step, Task
    from fer_dist.engine.trainer import train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, model, batches = step_setup(config_path, batch_size, world)
    accelerator = make_accelerator(cfg)
    heads, total, task = model.heads, torch.zeros((), dtype=torch.float64), Task(cfg, None, model)

    def loop(clip: float):
        net = copy.deepcopy(model)
        optimizer = make_optimizer(cfg.optim, net)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, steps + warmup, steps))
        net, optimizer = accelerator.prepare(net, optimizer)

        def step(inputs, target):
            nonlocal total
            loss, stepped = train_step(
                accelerator, net, optimizer, scheduler, task, Step(inputs, target, None, len(target)), clip
            )
            total += loss
            if stepped:
                first_raised(accelerator, stop_requested())

        return step

    def bare_loop():
        net = copy.deepcopy(model)
        optimizer = make_optimizer(cfg.optim, net)

        def step(inputs, target):
            loss = objective(net(**inputs), target, heads, cfg.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    variants = {"loop": loop(cfg.optim.grad_clip)}
    if bare:
        variants.update(loop_unclipped=loop(0.0), bare=bare_loop())
    seconds = dict.fromkeys(variants, 0.0)
    for i in range(warmup):
        for step in variants.values():
            step(*batches[i % len(batches)])
    for block in range(0, steps, 5):
        for name, step in variants.items():
            start = time.perf_counter()
            for i in range(block, min(steps, block + 5)):
                step(*batches[i % len(batches)])
            seconds[name] += time.perf_counter() - start
    if int(os.environ.get("RANK", "0")):
        return {}
    result = {f"{name}_s_per_step": t / steps for name, t in seconds.items()}
    return {**result, "samples_per_s": steps * batch_size * world / seconds["loop"], "world": world}


def time_memory(config_path: str, precision: str) -> dict:
    """What a training step keeps for backward: every tensor autograd saves in the forward pass,
    counted once per storage, at micro-batches 2 and 4; the difference is the per-sample part, the
    rest (weights saved as they are, or their 16-bit copies) is fixed. fp16 is measured as bf16
    autocast, whose tensors have the same size."""
    import torch

    saved = {}
    for batch_size in (2, 4):
        cfg, model, batches = step_setup(config_path, batch_size)
        storages: dict[int, int] = {}

        def keep(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        half = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "fp16")
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), half:
            model(**batches[0][0])
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[batch_size] = sum(n for ptr, n in storages.items() if ptr not in own)
    per_sample = (saved[4] - saved[2]) / 2
    return {
        "activation_bytes_per_sample": per_sample,
        "fixed_saved_bytes": saved[2] - 2 * per_sample,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def fits(memory: dict, gpu_gb: float = 11.0, reserve_gb: float = 1.0) -> int:
    """Largest micro-batch whose step fits `gpu_gb`: fp32 weights, gradients and AdamW's two moments
    (16 bytes per parameter), what the forward pass saves, and `reserve_gb` for the CUDA context,
    cuDNN workspaces and allocator slack."""
    static = memory["parameters"] * 16 + memory["fixed_saved_bytes"]
    return int(((gpu_gb - reserve_gb) * 2**30 - static) // memory["activation_bytes_per_sample"])


def bench_step(config_path: str, paper_config: str, batch_size: int, steps: int) -> dict:
    """fer-dist's step against the bare loop, 1 against 2 processes, and the paper model's memory
    at 224x224 on an 11 GB GPU."""
    from fer_dist import config

    job = {"config_path": config_path, "batch_size": batch_size, "steps": steps, "warmup": 3}
    both = child("time_steps", **job, bare=True)[0]
    throughput = {1: both["samples_per_s"]}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(config.LAUNCH / "cpu.yaml"), "--num_processes", "2"]
    cmd += ["-m", "fer_dist.bench", "time_steps", json.dumps({**job, "bare": False})]
    throughput[2] = json.loads(run_measured(cmd)[2].strip().splitlines()[-1])["samples_per_s"]
    memory = {p: child("time_memory", config_path=paper_config, precision=p)[0] for p in ("fp32", "fp16")}
    return {
        "config": config_path,
        "batch_size": batch_size,
        "steps": steps,
        "grad_clip": config.load(config_path).optim.grad_clip,
        "loop_s_per_step": both["loop_s_per_step"],
        "loop_unclipped_s_per_step": both["loop_unclipped_s_per_step"],
        "bare_s_per_step": both["bare_s_per_step"],
        "overhead": both["loop_s_per_step"] / both["bare_s_per_step"] - 1,
        "overhead_unclipped": both["loop_unclipped_s_per_step"] / both["bare_s_per_step"] - 1,
        "throughput_1proc": throughput[1],
        "throughput_2proc": throughput[2],
        "scaling_2proc": throughput[2] / throughput[1],
        "paper_model": paper_config,
        "paper_model_parameters": memory["fp32"]["parameters"],
        "activation_mb_per_sample": {p: m["activation_bytes_per_sample"] / 2**20 for p, m in memory.items()},
        "max_micro_batch_11gb": {p: fits(m) for p, m in memory.items()},
    }


def show(result: dict) -> None:
    rows = [
        {"what": "fer-dist loop, s/step", "value": f"{result['loop_s_per_step']:.4f}"},
        {"what": "bare PyTorch loop, s/step", "value": f"{result['bare_s_per_step']:.4f}"},
        {
            "what": "fer-dist loop without gradient clipping, s/step",
            "value": f"{result['loop_unclipped_s_per_step']:.4f}",
        },
        {"what": "overhead", "value": f"{result['overhead']:+.1%}"},
        {"what": "overhead without clipping", "value": f"{result['overhead_unclipped']:+.1%}"},
        {"what": "samples/s, 1 process", "value": f"{result['throughput_1proc']:.1f}"},
        {"what": "samples/s, 2 processes", "value": f"{result['throughput_2proc']:.1f}"},
    ]
    rows += [
        {"what": f"paper model, largest micro-batch on 11 GB ({p})", "value": str(n)}
        for p, n in result["max_micro_batch_11gb"].items()
    ]
    title = f"training step: {Path(result['config']).name}, batch {result['batch_size']}"
    print_table(title, {"what": "", "value": ""}, rows)
