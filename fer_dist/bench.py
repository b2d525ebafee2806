"""`fer-dist bench`: the performance figures quoted in the README, measured on synthetic data.

Every figure comes from real processes started the way users start them, timed from outside;
peak memory is the largest summed RSS of the whole process tree, sampled every 20 ms.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def synthetic(workdir: Path, videos: int, seed: int = 0) -> Path:
    """The benchmark's dataset, made once and reused."""
    from fer_dist.synth import synthesize

    root = workdir / f"affwild2-{videos}v"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root, videos, seed, 2)
        (root / ".complete").touch()
    return root


# `fer-dist shard` as a user runs it, but also timing pack() itself: the command's wall time includes
# starting Python and importing torch, seconds that do not grow with the data.
PACK_TIMED = """
import sys, time
from pathlib import Path
from fer_dist.affwild2 import discover
from fer_dist.shard import PackParams, pack
videos = discover(Path(sys.argv[1]))
start = time.perf_counter()
pack(videos, Path(sys.argv[2]), PackParams(), int(sys.argv[3]))
print(time.perf_counter() - start)
"""


def bench_pack(workdir: Path, videos: int, workers: list[int]) -> dict:
    """Labelled frames packed per second, per core, for each worker count (from an empty output)."""
    from fer_dist.affwild2 import discover, read_annotation

    root = synthetic(workdir, videos)
    frames = sum(int((read_annotation(v.annotation) >= 0).sum()) for v in discover(root))
    results = []
    for n in workers:
        out = workdir / f"shards-{n}w"
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak, inner = run_measured([sys.executable, "-c", PACK_TIMED, str(root), str(out), str(n)])
        packing = float(inner)
        results.append(
            {
                "workers": n,
                "seconds": round(seconds, 2),
                "pack_seconds": round(packing, 2),
                "frames_per_s": round(frames / packing),
                "frames_per_s_per_core": round(frames / packing / n),
                "peak_rss_mb": round(peak),
            }
        )
        shutil.rmtree(out)
    base = results[0]["frames_per_s"] / workers[0]
    for r in results:
        r["scaling"] = round(r["frames_per_s"] / (base * r["workers"]), 2)
    return {"labelled_frames": frames, "videos": videos, "runs": results}
