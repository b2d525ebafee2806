"""`fer-dist bench pack`: labelled frames packed per second and per core, for each worker count,
from an empty output folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from fer_dist.bench.common import child, synthetic
from fer_dist.console import print_table


def time_pack(root: str, out: str, workers: int) -> dict:
    """pack() alone, after its workers' forkserver has started: that start (one import of torch)
    is paid once per command, whatever the data, and is reported on its own."""
    import os

    from fer_dist.data.packing.layout import discover
    from fer_dist.data.packing.pack import PackParams, pack, worker_context

    videos = discover(Path(root))
    start = time.perf_counter()
    first = worker_context().Process(target=os.getpid)  # forked once the server has its imports
    first.start()
    first.join()
    started = time.perf_counter()
    pack(videos, Path(out), PackParams(), workers)
    return {"server_start_seconds": started - start, "seconds": time.perf_counter() - started}


def bench_pack(workdir: Path, videos: int, workers: list[int]) -> dict:
    """Labelled frames packed per second, per core, for each worker count (from an empty output).

    The command's wall time also includes starting Python, importing torch and starting the
    workers' forkserver, seconds that do not grow with the data; `pack_seconds` is pack() alone."""
    from fer_dist.data.packing.layout import discover, read_annotation

    root = synthetic(workdir, videos)
    frames = sum(int((read_annotation(v.annotation) >= 0).sum()) for v in discover(root))
    results = []
    for n in workers:
        out = workdir / f"shards-{n}w"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        inner, peak = child("time_pack", root=str(root), out=str(out), workers=n)
        seconds = time.perf_counter() - start
        results.append(
            {
                "workers": n,
                "seconds": round(seconds, 2),
                "server_start_seconds": round(inner["server_start_seconds"], 2),
                "pack_seconds": round(inner["seconds"], 2),
                "frames_per_s": round(frames / inner["seconds"]),
                "frames_per_s_per_core": round(frames / inner["seconds"] / n),
                "peak_rss_mb": round(peak),
            }
        )
        shutil.rmtree(out)
    base = results[0]["frames_per_s"] / workers[0]
    for r in results:
        r["scaling"] = round(r["frames_per_s"] / (base * r["workers"]), 2)
    return {"labelled_frames": frames, "videos": videos, "runs": results}


def show(result: dict) -> None:
    columns = {
        "workers": "workers",
        "seconds": "command s",
        "server_start_seconds": "workers' server start s",
        "pack_seconds": "pack() s",
        "frames_per_s": "frames/s",
        "frames_per_s_per_core": "frames/s per core",
        "scaling": "scaling",
        "peak_rss_mb": "peak RSS (MB)",
    }
    title = f"fer-dist shard: {result['labelled_frames']} labelled frames, {result['videos']} videos"
    print_table(title, columns, result["runs"])
