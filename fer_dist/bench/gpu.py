"""`fer-dist bench gpu`: the GPU path, measured on the machine's first CUDA device.

    step      the paper model (configs/mfm_swin_tiny.yaml: Swin-Tiny branches and the fusion at
              224 x 224) training step in fp32, fp16 (loss scaling) and bf16 where the GPU has it,
              with channels_last and torch.compile off and on: samples/s and peak memory
    1080 Ti   the largest fp32 micro-batch whose step fits in 11 GiB, the process capped with
              torch.cuda.set_per_process_memory_fraction, with and without gradient checkpointing
    feeding   real training steps fed by the real stream from synthetic shards, with 1, 2, 4 and 8
              loader workers, crops decoded by the workers and on the GPU: the share of the step
              time spent waiting for data, and the fewest workers that keep the GPU busy

Each measurement runs in its own process (bench/common.py), so that precisions, compilation and
memory caps do not leak from one into the next. Without CUDA the command refuses in one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fer_dist.bench.common import child, packed, synthetic
from fer_dist.console import out, print_table
from fer_dist.errors import InputError

GIB = 2**30
BUDGET_GIB = 11.0  # a GTX 1080 Ti's memory, as the paper trained on
WAIT_BUDGET = 0.05  # a GPU counts as fed when at most this share of its step time waits for data
WORKERS = (1, 2, 4, 8)


class Unavailable(InputError):
    """The benchmark needs hardware this machine does not have."""


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("fer-dist bench gpu needs a CUDA GPU; this machine has none")


def largest_batch(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """The largest micro-batch b <= limit with fits(b), for a `fits` that holds up to some size and
    not beyond: doubling until it fails, then bisection. 0 when not even one sample fits."""
    if not fits(1):
        return 0
    good, bad = 1, 2
    while bad <= limit and fits(bad):
        good, bad = bad, 2 * bad
    bad = min(bad, limit + 1)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def wait_share(wait_s: float, compute_s: float) -> float:
    """The share of a training loop's time spent waiting for the next batch."""
    return wait_s / max(wait_s + compute_s, 1e-12)


def workers_needed(rows: list[dict], decode: str, budget: float = WAIT_BUDGET) -> int | None:
    """The fewest loader workers whose steps waited at most `budget` of their time with `decode`;
    None when no measured count was enough."""
    fed = [r["workers"] for r in rows if r["decode"] == decode and r["wait_share"] <= budget]
    return min(fed) if fed else None


def paper_setup(overrides: list[str]):
    """The paper config's model, prepared by Accelerate with an optimiser, and its task."""
    import torch

    from fer_dist import config
    from fer_dist.engine.distributed import make_accelerator
    from fer_dist.engine.optim import initialise, lr_factor, make_optimizer
    from fer_dist.engine.task import Task
    from fer_dist.models import build

    cfg = config.load(config.CONFIGS / "mfm_swin_tiny.yaml", ["model.pretrained=false", *overrides])
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
    initialise(model, cfg.train)
    optimizer = make_optimizer(cfg.optim, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, 10_000, 1_000))
    model, optimizer = accelerator.prepare(model, optimizer)
    return cfg, accelerator, model, optimizer, scheduler, Task(cfg, None, accelerator.unwrap_model(model))


def random_step(cfg, device, batch_size: int):
    import torch

    from fer_dist.engine.task import Step

    g = torch.Generator(device=device).manual_seed(0)
    size, audio = cfg.data.image_size, cfg.data.audio_size
    inputs = {
        "image": torch.randn(batch_size, 3, size, size, generator=g, device=device),
        "audio": torch.randn(batch_size, 1, *audio, generator=g, device=device),
    }
    if cfg.train.channels_last:
        inputs = {k: v.contiguous(memory_format=torch.channels_last) for k, v in inputs.items()}
    labels = torch.randint(0, 8, (batch_size,), generator=g, device=device)
    return Step(inputs, {"expr": labels}, None, batch_size)


def time_gpu_step(precision: str, channels_last: bool, compile: bool, batch_size: int, steps: int) -> dict:
    """Samples/s and peak memory of fer-dist's training step on the paper model, random inputs."""
    import torch

    from fer_dist.engine.trainer import train_step

    overrides = [f"train.mixed_precision={precision}", f"train.channels_last={channels_last}"]
    overrides += [f"train.compile={compile}", f"data.batch_size={batch_size}"]
    cfg, accelerator, model, optimizer, scheduler, task = paper_setup(overrides)
    step = random_step(cfg, accelerator.device, batch_size)
    for _ in range(5):  # warm-up, compilation included
        train_step(accelerator, model, optimizer, scheduler, task, step, cfg.optim.grad_clip)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(accelerator, model, optimizer, scheduler, task, step, cfg.optim.grad_clip)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"samples_per_s": steps * batch_size / seconds, "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def time_max_batch(checkpointing: bool, budget_gib: float) -> dict:
    """The largest fp32 micro-batch whose training step fits under a cap of `budget_gib`."""
    import torch

    from fer_dist.engine.trainer import train_step

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total))
    overrides = ["train.mixed_precision=no", f"train.gradient_checkpointing={checkpointing}"]
    cfg, accelerator, model, optimizer, scheduler, task = paper_setup(overrides)

    def fits(batch_size: int) -> bool:
        try:
            step = random_step(cfg, accelerator.device, batch_size)
            for _ in range(2):  # the second step holds the optimiser's moments too
                train_step(accelerator, model, optimizer, scheduler, task, step, cfg.optim.grad_clip)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            step = None
            torch.cuda.empty_cache()

    return {"max_micro_batch": largest_batch(fits), "budget_gib": budget_gib}


def time_feeding(shards: str, workers: int, decode: str, batch_size: int, steps: int) -> dict:
    """Real training steps of the paper model fed by the stream: seconds waiting for batches against
    seconds computing (the device synchronised after each step, so that its work is counted)."""
    import torch

    from fer_dist.data.shards.format import read_manifest
    from fer_dist.data.stream import pipeline
    from fer_dist.engine.task import Task
    from fer_dist.engine.trainer import train_step

    overrides = [f"data.shards={shards}", f"data.workers={workers}", f"data.decode={decode}"]
    overrides += [f"data.batch_size={batch_size}", f"data.epoch_samples={(steps + 10) * batch_size}"]
    cfg, accelerator, model, optimizer, scheduler, _ = paper_setup(overrides)
    manifest, net = read_manifest(shards), accelerator.unwrap_model(model)
    training = pipeline.TrainStream(cfg.data, manifest, net.inputs, seed=0, rank=0, world=1)
    task = Task(cfg, manifest, net, training.class_counts)
    loader = training.loader(epoch=0)
    waiting = computing = 0.0
    batches = iter(loader)
    for i in range(steps + 10):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        step = task.prepare(batch, accelerator.device, train=True)
        train_step(accelerator, model, optimizer, scheduler, task, step, cfg.optim.grad_clip)
        torch.cuda.synchronize()
        if i >= 10:  # after the workers' start and the first batches
            waiting, computing = waiting + fetched - start, computing + time.perf_counter() - fetched
    share = wait_share(waiting, computing)
    return {
        "workers": workers,
        "decode": decode,
        "wait_share": share,
        "samples_per_s": steps * batch_size / (waiting + computing),
    }


def bench_gpu(workdir: Path, videos: int, steps: int, batch_size: int = 32) -> dict:
    import torch

    require_cuda()
    precisions = ["no", "fp16", *(["bf16"] if torch.cuda.is_bf16_supported() else [])]
    step_rows = []
    for precision in precisions:
        for channels_last in (False, True):
            for compile in (False, True):
                job = {"precision": precision, "channels_last": channels_last, "compile": compile}
                result = child("time_gpu_step", **job, batch_size=batch_size, steps=steps)[0]
                step_rows.append({**job, **result})
    largest = {
        ("with" if c else "without") + " gradient checkpointing": child(
            "time_max_batch", checkpointing=c, budget_gib=BUDGET_GIB
        )[0]["max_micro_batch"]
        for c in (False, True)
    }
    shards = str(packed(workdir, synthetic(workdir, videos), 2))
    feeding = [
        child("time_feeding", shards=shards, workers=w, decode=d, batch_size=batch_size, steps=steps)[0]
        for d in ("cpu", "gpu")
        for w in WORKERS
    ]
    return {
        "gpu": torch.cuda.get_device_name(0),
        "batch_size": batch_size,
        "steps": step_rows,
        "max_micro_batch_11gib_fp32": largest,
        "feeding": feeding,
        "workers_needed": {d: workers_needed(feeding, d) for d in ("cpu", "gpu")},
    }


def show(result: dict) -> None:
    rows = [
        {**r, "samples_per_s": f"{r['samples_per_s']:.0f}", "peak_gib": f"{r['peak_gib']:.2f}"} for r in result["steps"]
    ]
    columns = {
        "precision": "precision",
        "channels_last": "channels_last",
        "compile": "compile",
        "samples_per_s": "samples/s",
        "peak_gib": "peak GiB",
    }
    print_table(f"{result['gpu']}: the paper model's training step, batch {result['batch_size']}", columns, rows)
    for setting, n in result["max_micro_batch_11gib_fp32"].items():
        out.print(f"largest fp32 micro-batch within {BUDGET_GIB:g} GiB, {setting}: {n}")
    rows = [
        {**r, "wait_share": f"{r['wait_share']:.1%}", "samples_per_s": f"{r['samples_per_s']:.0f}"}
        for r in result["feeding"]
    ]
    columns = {
        "decode": "decode",
        "workers": "loader workers",
        "wait_share": "time waiting for data",
        "samples_per_s": "samples/s",
    }
    print_table("training fed by the stream", columns, rows)
    for decode, n in result["workers_needed"].items():
        out.print(f"loader workers that keep the GPU busy, decoding on the {decode}: {n or f'more than {WORKERS[-1]}'}")
