"""`fer-dist bench loader`: the training stream against a folder-of-JPEGs loader in the style of
the ABAW teams' code (`bench/baseline.py`) and against the limit, decoding the same JPEG bytes and
nothing else; all with the same workers and batch size, in samples per second per worker; and
the class shares the stream emits against its resampling target."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from fer_dist.bench.common import child, packed, spread, synthetic, timed_batches
from fer_dist.console import out, print_table
from fer_dist.data.shards.format import Shard, manifest_path, read_manifest
from fer_dist.labels import CLASSES


def time_stream(shards: str, workers: int, samples: int, batch_size: int) -> dict:
    from fer_dist import config
    from fer_dist.data.shards.format import read_manifest
    from fer_dist.data.stream.balance import resampling_plan
    from fer_dist.data.stream.counts import Tally, describe
    from fer_dist.data.stream.pipeline import train_loader

    overrides = [f"data.shards={shards}", f"data.workers={workers}", f"data.batch_size={batch_size}"]
    cfg = config.load(None, overrides).data
    manifest = read_manifest(Path(shards))
    plan = resampling_plan(manifest, manifest.fold_groups(cfg.holdout_fold), cfg)
    passes = math.ceil(samples / plan.emitted.sum())  # whole passes over the shards, as epochs are
    cfg.epoch_samples = math.ceil(passes * plan.emitted.sum())
    loader, _ = train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)
    histogram, tally = np.zeros(8, np.int64), Tally()

    def count(batch: dict) -> None:
        histogram[:] += np.bincount(batch["label"].numpy(), minlength=8)
        tally.see(batch)

    result = timed_batches(loader, batch_size, count)
    return {
        **result,
        "emitted": int(histogram.sum()),
        "passes": passes,
        "emitted_class_fraction": (histogram / histogram.sum()).round(5).tolist(),
        "target_class_fraction": plan.target.round(5).tolist(),
        "discarded_fraction": round(describe(tally.total())["discarded_fraction"], 4),
    }


def scaled(shards: Path, factor: int) -> Path:
    """The shards `factor` times over (symbolic links, video records repeated): the stream's
    memory as the dataset grows, without packing it again."""
    out = shards.parent / f"{shards.name}-x{factor}"
    if manifest_path(out).exists():
        return out
    out.mkdir(exist_ok=True)
    manifest = read_manifest(shards)
    groups, videos = {}, dict(manifest.videos)
    for name, group in manifest.groups.items():
        entries = []
        for k in range(factor):
            for shard in group.shards:
                link = out / f"x{k}-{shard.name}"
                if not link.exists():
                    os.symlink((shards / shard.name).resolve(), link)
                entries.append(Shard(link.name, shard.samples))
        groups[name] = dataclasses.replace(group, shards=entries, samples=group.samples * factor)
    for k in range(1, factor):
        videos.update({f"{v}#{k}": record for v, record in manifest.videos.items()})
    dataclasses.replace(manifest, groups=groups, videos=videos).write(out)
    return out


def bench_loader(workdir: Path, videos: int, workers: int, samples: int, batch_size: int = 32, rounds: int = 5) -> dict:
    """The stream, the decode limit and the teams'-style loader, each in a fresh process, timed in
    turn `rounds` times; each ratio is taken within a round and reported as the median over the
    rounds with its range, so that the machine's speed drifting between rounds falls on both sides
    of a ratio and a round slowed by something else moves the range, not the median."""
    root = synthetic(workdir, videos)
    shards = packed(workdir, root, 2)
    common = {"workers": workers, "batch_size": batch_size}
    side = {"root": str(root), "shards": str(shards), "mel_dir": str(workdir / f"{root.name}-mels")}
    runs: dict[str, list] = {"stream": [], "decode": [], "teams": []}
    for _ in range(rounds):
        runs["stream"].append(child("time_stream", shards=str(shards), samples=samples, **common))
        runs["decode"].append(child("time_decode", samples=samples, **side, **common))
        runs["teams"].append(child("time_teams", samples=max(2000, samples // 10), **side, **common))
    _, large_peak = child("time_stream", shards=str(scaled(shards, 10)), samples=samples, **common)
    rates = {name: [r["samples_per_s"] / max(1, workers) for r, _ in found] for name, found in runs.items()}
    stream, stream_peak = runs["stream"][0]
    emitted, target = np.array(stream["emitted_class_fraction"]), np.array(stream["target_class_fraction"])
    pairs = zip(rates["stream"], rates["decode"], rates["teams"], strict=True)
    limit_share, over_teams = zip(*[(s / d, s / t) for s, d, t in pairs], strict=True)
    return {
        "videos": videos,
        "workers": workers,
        "batch_size": batch_size,
        "rounds": rounds,
        "stream_per_worker": spread(rates["stream"], 0),
        "baseline_per_worker": spread(rates["teams"], 0),
        "decode_limit_per_worker": spread(rates["decode"], 0),
        "stream_vs_decode_limit": spread(list(limit_share), 3),
        "stream_vs_baseline": spread(list(over_teams), 2),
        "emitted_samples": stream["emitted"],
        "passes_over_the_shards": stream["passes"],
        "emitted_class_fraction": stream["emitted_class_fraction"],
        "target_class_fraction": stream["target_class_fraction"],
        "max_relative_class_error": round(float(np.max(np.abs(emitted[target > 0] / target[target > 0] - 1))), 4),
        "discarded_fraction": stream["discarded_fraction"],
        "peak_rss_mb": round(stream_peak),
        "peak_rss_mb_10x_dataset": round(large_peak),
        "baseline_peak_rss_mb": round(runs["teams"][0][1]),
        "decode_limit_peak_rss_mb": round(runs["decode"][0][1]),
    }


def ranged(figure: dict, fmt: str = "{:,.0f}") -> str:
    """'median (min-max)' of a `spread`."""
    return f"{fmt.format(figure['median'])} ({fmt.format(figure['min'])}-{fmt.format(figure['max'])})"


def show(result: dict) -> None:
    r = result
    rows = [
        {"loader": "training stream", "rate": ranged(r["stream_per_worker"]), "rss": r["peak_rss_mb"]},
        {
            "loader": "folder of JPEGs (teams' style)",
            "rate": ranged(r["baseline_per_worker"]),
            "rss": r["baseline_peak_rss_mb"],
        },
        {
            "loader": "decode only (limit)",
            "rate": ranged(r["decode_limit_per_worker"]),
            "rss": r["decode_limit_peak_rss_mb"],
        },
        {"loader": "training stream, 10x dataset", "rate": "", "rss": r["peak_rss_mb_10x_dataset"]},
    ]
    title = f"loaders, {r['workers']} worker(s), batch {r['batch_size']}: median (min-max) of {r['rounds']} rounds"
    print_table(title, {"loader": "loader", "rate": "samples/s per worker", "rss": "peak RSS (MB)"}, rows)
    classes = [
        {"c": c, "t": f"{t:.4f}", "e": f"{e:.4f}"}
        for c, t, e in zip(CLASSES, r["target_class_fraction"], r["emitted_class_fraction"], strict=True)
    ]
    print_table(
        f"class shares over {r['emitted_samples']} emitted samples",
        {"c": "class", "t": "target", "e": "emitted"},
        classes,
    )
    out.print(
        f"stream / decode limit {ranged(r['stream_vs_decode_limit'], '{:.0%}')} (goal >= 70%), "
        f"stream / teams' loader {ranged(r['stream_vs_baseline'], '{:.1f}x')} (goal >= 5x), "
        f"largest relative class error {r['max_relative_class_error']:.1%}, "
        f"discarded {r['discarded_fraction']:.1%} of what was read"
    )
