"""`fer-dist bench`: the performance figures quoted in the README, measured on synthetic data.

pack    bench/pack.py     packing speed per core, for each worker count
loader  bench/loader.py   the training stream against the teams' loader and the decode limit
step    bench/step.py     fer-dist's training step against a bare loop; 1 and 2 processes; memory
models  bench/models.py   every paper's system trained by its CPU config: speed and macro-F1
learn   bench/learn.py    fer-dist's training against a plain PyTorch loop on a hard image cue
gpu     bench/gpu.py      the paper model's step on a GPU, the 1080 Ti's micro-batch, the workers a GPU needs

The synthetic datasets and shards they measure on are made once and kept in the user's cache
(`~/.cache/fer-dist/bench`, or under `$XDG_CACHE_HOME`), not in the current folder, unless
`--workdir` names a folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from fer_dist.bench import gpu, learn, loader, models, pack, step
from fer_dist.errors import InputError

BENCHMARKS = {"pack": pack, "loader": loader, "step": step, "models": models, "learn": learn, "gpu": gpu}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fer-dist" / "bench"


STEPS = {"step": step.DEFAULT_STEPS, "gpu": 100, "learn": 1500}  # each benchmark's steps when --steps does not say


def run(
    what: str,
    workdir: Path | None,
    videos: int,
    workers: list[int],
    samples: int,
    steps: int | None,
    length: int = 1000,
    seeds: tuple[int, ...] = (0,),
) -> dict:
    """The benchmark's figures, as one JSON-ready dict. `length` and `seeds` are `learn`'s: frames
    per shape video, and the seeds each run is made with (its data set is the same for every seed).
    Raises InputError, before any data or folder is made, for fewer than 1 step, a repeated or
    negative seed, or a shapes set `synth.check` refuses; `gpu.Unavailable` (an InputError) without CUDA."""
    from fer_dist.config import CONFIGS

    if steps is not None and steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    steps = steps or STEPS.get(what, 0)
    if what == "gpu":
        gpu.require_cuda()  # before any data is made
    if what == "learn":  # before any data is made
        from fer_dist.data.packing.synth import check

        learn.check_seeds(seeds)
        check(videos, length, "shapes")
    if what == "step":  # in-memory batches: no data, no work folder
        return step.bench_step(str(CONFIGS / "mfm_cpu.yaml"), str(CONFIGS / "mfm_swin_tiny.yaml"), 32, steps)
    workdir = workdir or cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    if what == "gpu":
        return gpu.bench_gpu(workdir, videos, steps)
    if what == "pack":
        return pack.bench_pack(workdir, videos, workers)
    if what == "loader":
        return loader.bench_loader(workdir, videos, workers[-1], samples)
    if what == "learn":
        return learn.bench_learn(workdir, videos, length, steps, seeds=seeds)
    return models.bench_models(workdir, videos)


def show(what: str, result: dict) -> None:
    BENCHMARKS[what].show(result)
