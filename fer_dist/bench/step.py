"""`fer-dist bench step`: seconds per training step of fer-dist's loop against a bare PyTorch loop
on the same model and in-memory batches; throughput with 1 and 2 processes (launch/cpu.yaml); and
the memory one training step of the paper's Swin-Tiny fusion model needs, per sample."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fer_dist.bench.common import child, run_measured, spread
from fer_dist.console import console, print_table
from fer_dist.errors import InputError

if TYPE_CHECKING:  # torch, Accelerate and the models are imported when a benchmark runs
    from accelerate import Accelerator

    from fer_dist.config import Config
    from fer_dist.models.contract import ExpressionModel

BLOCK = 5  # steps of one variant in a row; a round is one block of each
PROCESSES = 3  # fresh processes whose rounds are pooled: where each copy of the model lands in memory
# moves one process's figures by up to 1 % (two copies of the same variant, timed alike, differed so)
LAUNCHES = 3  # runs of the two-process command, whose figure is a whole command's throughput
DEFAULT_STEPS = 450  # timed steps of each variant when --steps does not say
DEFAULT_ROUNDS = DEFAULT_STEPS // BLOCK  # 90: runs 1-9 on docs/performance.md, of one code, span 1.5 points
# the clipped variants' bound, which every step's norm exceeds, so that the clip scales the gradients
# on every timed step, as it did on 499 steps of 500 of a fold 0 training like the main job's at the
# CPU config's 1.0; at 1.0 here the model fits its four batches within about 40 steps and the clip stops biting
CLIP = 1e-6


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


def loop_step(
    cfg: Config,
    model: ExpressionModel,
    accelerator: Accelerator,
    steps: int,
    warmup: int,
    clip: float,
    bitten: list[bool],
) -> Callable:
    """fer-dist's training step on its own copy of `model`: Accelerate-prepared model and
    optimiser, the schedule of a run of `steps` + `warmup` steps, `train_step` (accumulation
    context, autocast, the gradients clipped at `clip`, none when 0), the loss kept on the device
    (summed into a float64 tensor) and, after each optimiser step, the ranks' agreement on a stop
    signal. Returns step(inputs, target); with `clip` > 0 each step appends to `bitten` whether the
    clip scaled the gradients."""
    import copy

    import torch

    from fer_dist.engine.checkpoint import stop_requested
    from fer_dist.engine.distributed import first_raised
    from fer_dist.engine.optim import lr_factor, make_optimizer
    from fer_dist.engine.task import Step, Task
    from fer_dist.engine.trainer import train_step

    task, total = Task(cfg, None, model), torch.zeros((), dtype=torch.float64)
    net = copy.deepcopy(model)
    optimizer = make_optimizer(cfg.optim, net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, steps + warmup, steps))
    net, optimizer = accelerator.prepare(net, optimizer)

    def step(inputs, target):
        nonlocal total
        loss, stepped = train_step(
            accelerator, net, optimizer, scheduler, task, Step(inputs, {"expr": target}, None, len(target)), clip
        )
        total += loss
        if stepped:
            first_raised(accelerator, stop_requested())
        if clip > 0:
            bitten.append(getattr(optimizer.optimizer, "grad_scale", None) is not None)

    return step


def bare_step(cfg: Config, model: ExpressionModel, clip: float) -> Callable:
    """A bare PyTorch step on its own copy of `model`: forward, loss, backward, torch's own
    `clip_grad_norm_` at `clip` (none when 0), optimiser step. Returns step(inputs, target)."""
    import copy

    import torch

    from fer_dist.engine.losses import objective
    from fer_dist.engine.optim import make_optimizer

    net, heads = copy.deepcopy(model), model.heads
    optimizer = make_optimizer(cfg.optim, net)

    def step(inputs, target):
        loss = objective(net(**inputs), target, heads, cfg.loss)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def warm_up(variants: dict[str, Callable], batches: list, warmup: int) -> None:
    """`warmup` steps of each of `variants` in turn, over the fixed `batches`."""
    for i in range(warmup):
        for step in variants.values():
            step(*batches[i % len(batches)])


def time_blocks(variants: dict[str, Callable], batches: list, steps: int) -> dict[str, list[float]]:
    """`steps` timed steps of each of `variants` over the fixed `batches`, in rounds of one block
    of `BLOCK` steps (the last round's shorter) of each, each variant first in turn. Returns each
    variant's seconds (wall clock) per block, in round order."""
    blocks: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for k, block in enumerate(range(0, steps, BLOCK)):
        for name in names[k % len(names) :] + names[: k % len(names)]:  # each goes first in turn
            step = variants[name]
            start = time.perf_counter()
            for i in range(block, min(steps, block + BLOCK)):
                step(*batches[i % len(batches)])
            blocks[name].append(time.perf_counter() - start)
    return blocks


def time_steps(config_path: str, batch_size: int, steps: int, warmup: int, bare: bool) -> dict:
    """Seconds per step of fer-dist's step (Accelerate-prepared model and optimiser, accumulation
    context, autocast, gradient clipping, schedule, the loss kept on the device, the per-step
    agreement between ranks on a stop signal), of the same without clipping, and, with `bare`, of
    a bare loop (forward, loss, backward, optimiser step) and of the bare loop with torch's own
    clip (`clip_grad_norm_` before the step), both clipped at `CLIP`. Each has its own copy of the model; they
    alternate in blocks of `BLOCK` steps, each first in turn, so that the machine's drift and
    whatever one leaves in the caches fall on all alike. Returns
    each variant's seconds per step in each block, and the timed steps of fer-dist's clipped loop
    whose clip scaled the gradients."""
    from fer_dist.engine.distributed import close_process_group, make_accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, model, batches = step_setup(config_path, batch_size, world)
    accelerator = make_accelerator(cfg)
    bitten: list[bool] = []
    variants = {"loop": loop_step(cfg, model, accelerator, steps, warmup, CLIP, bitten)}
    if bare:
        variants.update(
            loop_unclipped=loop_step(cfg, model, accelerator, steps, warmup, 0.0, bitten),
            bare=bare_step(cfg, model, 0.0),
            bare_clipped=bare_step(cfg, model, CLIP),
        )
    warm_up(variants, batches, warmup)
    bitten.clear()  # the timed steps only
    blocks = time_blocks(variants, batches, steps)
    close_process_group(accelerator, variants.clear)
    if int(os.environ.get("RANK", "0")):
        return {}
    sizes = [min(BLOCK, steps - block) for block in range(0, steps, BLOCK)]
    per_step = {name: [t / n for t, n in zip(b, sizes, strict=True)] for name, b in blocks.items()}
    samples_per_s = steps * batch_size * world / sum(blocks["loop"])
    return {"s_per_step_by_block": per_step, "samples_per_s": samples_per_s, "world": world, "clip_bit": sum(bitten)}


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
    """fer-dist's step against the bare loop (`steps` timed steps of each, over `PROCESSES` fresh
    processes whose rounds are pooled), 1 against 2 processes, and the paper model's memory at
    224x224 on an 11 GB GPU. Raises ValueError for fewer steps than one round in each process."""
    from fer_dist import config

    if steps < PROCESSES * BLOCK:
        raise InputError(
            f"bench step times at least one round of {BLOCK} steps in each of its {PROCESSES} processes: "
            f"--steps {steps} is fewer than {PROCESSES * BLOCK}"
        )
    job = {"config_path": config_path, "batch_size": batch_size, "steps": steps // PROCESSES, "warmup": 3}
    runs = [child("time_steps", **job, bare=True)[0] for _ in range(PROCESSES)]
    blocks = {
        name: np.concatenate([r["s_per_step_by_block"][name] for r in runs]) for name in runs[0]["s_per_step_by_block"]
    }
    one = [r["samples_per_s"] for r in runs]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(config.LAUNCH / "cpu.yaml"), "--num_processes", "2"]
    cmd += ["-m", "fer_dist.bench", "time_steps", json.dumps({**job, "bare": False})]
    two = [json.loads(run_measured(cmd)[2].strip().splitlines()[-1])["samples_per_s"] for _ in range(LAUNCHES)]
    memory = {p: child("time_memory", config_path=paper_config, precision=p)[0] for p in ("fp32", "fp16")}
    return {
        "config": config_path,
        "batch_size": batch_size,
        "steps": steps // PROCESSES * PROCESSES,
        "rounds": len(blocks["bare"]),
        "grad_clip": CLIP,
        "clip_bit": sum(r["clip_bit"] for r in runs),
        "s_per_step": {name: spread(list(b), 5) for name, b in blocks.items()},
        "overhead": spread(list(blocks["loop"] / blocks["bare"] - 1)),
        "overhead_unclipped": spread(list(blocks["loop_unclipped"] / blocks["bare"] - 1)),
        "overhead_over_bare_clipped": spread(list(blocks["loop"] / blocks["bare_clipped"] - 1)),
        "processes": PROCESSES,
        "throughput_1proc": spread(one, 1),
        "throughput_2proc": spread(two, 1),
        "scaling_2proc": round(float(np.median(two) / np.median(one)), 3),
        "paper_model": paper_config,
        "paper_model_parameters": memory["fp32"]["parameters"],
        "activation_mb_per_sample": {p: m["activation_bytes_per_sample"] / 2**20 for p, m in memory.items()},
        "max_micro_batch_11gb": {p: fits(m) for p, m in memory.items()},
    }


def show(result: dict) -> None:
    r = result

    def ranged(figure: dict, fmt: str) -> str:
        return f"{fmt.format(figure['median'])} ({fmt.format(figure['min'])} to {fmt.format(figure['max'])})"

    per_step = r["s_per_step"]
    rows = [
        {
            "what": f"fer-dist loop, clipped at {r['grad_clip']:g} (a bound every step exceeds), s/step",
            "value": ranged(per_step["loop"], "{:.4f}"),
        },
        {"what": "its timed steps whose clip scaled the gradients", "value": f"{r['clip_bit']} of {r['steps']}"},
        {
            "what": "fer-dist loop without gradient clipping, s/step",
            "value": ranged(per_step["loop_unclipped"], "{:.4f}"),
        },
        {"what": "bare PyTorch loop, s/step", "value": ranged(per_step["bare"], "{:.4f}")},
        {"what": "bare loop with clip_grad_norm_, s/step", "value": ranged(per_step["bare_clipped"], "{:.4f}")},
        {"what": "overhead with clipping over the bare loop (goal <= 3%)", "value": ranged(r["overhead"], "{:+.1%}")},
        {"what": "overhead without clipping (goal <= 3%)", "value": ranged(r["overhead_unclipped"], "{:+.1%}")},
        {
            "what": "overhead over the bare loop that also clips",
            "value": ranged(r["overhead_over_bare_clipped"], "{:+.1%}"),
        },
        {
            "what": f"samples/s, 1 process ({r['processes']} processes in turn)",
            "value": ranged(r["throughput_1proc"], "{:.1f}"),
        },
        {
            "what": f"samples/s, 2 processes ({LAUNCHES} launches)",
            "value": f"{ranged(r['throughput_2proc'], '{:.1f}')} ({r['scaling_2proc']:.2f}x)",
        },
    ]
    rows += [
        {"what": f"paper model, largest micro-batch on 11 GB ({p})", "value": str(n)}
        for p, n in r["max_micro_batch_11gb"].items()
    ]
    title = (
        f"training step: {Path(r['config']).name}, batch {r['batch_size']}: "
        f"median (min to max) of {r['rounds']} rounds from {r['processes']} processes"
    )
    print_table(title, {"what": "", "value": ""}, rows)
    if r["rounds"] < DEFAULT_ROUNDS:
        console.print(
            f"[yellow]note:[/] {r['rounds']} rounds, fewer than the default {DEFAULT_ROUNDS}: a round's ratio moves by "
            "several percent here, and the medians above move with it (docs/performance.md, Training step)"
        )
