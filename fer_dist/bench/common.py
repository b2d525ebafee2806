"""What every benchmark shares: each measurement runs in its own process (`python -m fer_dist.bench
JOB ARGS`), which times its own work and prints it as JSON; peak memory is the largest summed RSS
of that process and its workers, sampled every 20 ms from outside. Datasets and shards are made
once in the work folder and reused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Runs a command; returns (seconds, peak RSS of its process tree in MB, its stdout)."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stdout, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return seconds, peak / 2**20, stdout


def synthetic(workdir: Path, videos: int, seed: int = 0, style: str = "faces", length: int = 1000) -> Path:
    """The benchmark's dataset (`fer-dist synth --style --length`: `length` frames per video), made
    once and reused."""
    from fer_dist.data.packing.synth import synthesize

    root = workdir / f"{'affwild2' if style == 'faces' else style}-{videos}v{'' if length == 1000 else f'-{length}f'}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root, videos, seed, 2, style=style, length=length)
        (root / ".complete").touch()
    return root


def spread(values: list[float], digits: int = 4) -> dict:
    """A repeated measurement as its median, range and standard deviation: {"median", "min", "max",
    "sd", "n"}. The median of n repeats taken in turn with what it is compared to stands when fewer
    than n / 2 of them were slowed by something else on the machine."""
    return {
        "median": round(float(np.median(values)), digits),
        "min": round(float(np.min(values)), digits),
        "max": round(float(np.max(values)), digits),
        "sd": round(float(np.std(values)), digits),
        "n": len(values),
    }


def train_run(config: Path, run_dir: Path, *overrides: str) -> dict:
    """`fer-dist train --config CONFIG` into a fresh `run_dir` (with no tracker), in its own
    process; returns its last epoch's line of `metrics.jsonl`."""
    from fer_dist.engine.rundir import RunDir

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "fer_dist.train", "--config", str(config), f"train.run_dir={run_dir}"]
    run_measured([*cmd, "train.log_with=[]", *overrides])
    return RunDir(run_dir).metrics()[-1]


def child(job: str, **kwargs) -> tuple[dict, float]:
    """Runs `job` of this module in a fresh process; returns its JSON result and peak RSS in MB."""
    _, peak, stdout = run_measured([sys.executable, "-m", "fer_dist.bench", job, json.dumps(kwargs)])
    return json.loads(stdout.strip().splitlines()[-1]), peak


def packed(workdir: Path, root: Path, workers: int, audio_wave: bool = False) -> Path:
    """The benchmark's shards (default packing, with waveforms if asked), made once and reused."""
    from fer_dist.data.packing.layout import discover
    from fer_dist.data.packing.pack import PackParams, pack
    from fer_dist.data.shards.format import manifest_path

    out = workdir / f"{root.name}-{'wave-' if audio_wave else ''}shards"
    if not manifest_path(out).exists():
        pack(discover(root), out, PackParams(audio_wave=audio_wave), workers)
    return out


def timed_batches(loader, batch_size: int, on_batch=None) -> dict:
    """Samples per second from the first batch on: worker start-up and buffer filling excluded."""
    start, batches = None, 0
    for batch in loader:
        if on_batch:
            on_batch(batch)
        if start is None:
            start = time.perf_counter()
        else:
            batches += 1
    return {"samples_per_s": batches * batch_size / (time.perf_counter() - start)}
