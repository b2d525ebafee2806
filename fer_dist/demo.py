"""The main job on the built-in synthetic data: synthesize, shard, train the fusion model on CPU
holding out one fold, and print the held-out macro-F1 of each head.

Each stage is skipped when its output is already complete, so a rerun goes straight to training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fer_dist import config, train
from fer_dist.affwild2 import CLASSES, discover
from fer_dist.shard import PackParams, pack

CONFIG = config.CONFIGS / "mfm_cpu.yaml"
HEADS = {
    "image": "image only (Y_I)",
    "audio": "audio only (Y_A)",
    "fusion": "fusion (Y_T)",
    "ensemble": "ensemble of the three",
}


def main_job(workdir: Path, videos: int = 24, seed: int = 0, epochs: int | None = None) -> int:
    from fer_dist.cli import bar, report

    console = Console()
    started = time.perf_counter()
    data, shards, run_dir = workdir / "affwild2", workdir / "shards", workdir / "run"
    if not (data / ".complete").exists():
        from fer_dist.synth import synthesize

        with bar() as progress:
            task = progress.add_task("synthesizing videos", total=videos, info="")
            synthesize(data, videos, seed, 2, lambda: progress.advance(task))
        (data / ".complete").touch()
    if not (shards / "manifest.json").exists():
        vids = discover(data)
        with bar() as progress:
            task = progress.add_task("packing videos", total=len(vids), info="")
            manifest = pack(
                vids, shards, PackParams(samples_per_shard=500, seed=seed), 2, lambda _, n: progress.advance(task)
            )
        report(manifest)
    if not CONFIG.exists():
        raise FileNotFoundError(f"{CONFIG} not found: run the demo from a checkout of fer-dist")
    overrides = [f"data.shards={shards}", f"train.run_dir={run_dir}", f"train.seed={seed}"]
    if epochs:
        overrides.append(f"train.epochs={epochs}")
    cfg = config.load(CONFIG, overrides)
    shutil.rmtree(run_dir, ignore_errors=True)
    metrics = train.run(cfg)

    table = Table(title=f"held-out fold {cfg.data.holdout_fold}: macro-F1 after {cfg.train.epochs} epochs")
    table.add_column("head")
    table.add_column("macro-F1", justify="right")
    for head, title in HEADS.items():
        table.add_row(title, f"{metrics['macro_f1_by_head'][head]:.3f}")
    console.print(table)
    per_class = Table(title="ensemble F1 per class")
    for name in CLASSES:
        per_class.add_column(name, justify="right")
    per_class.add_row(*(f"{metrics['per_class_f1'][c]:.3f}" for c in CLASSES))
    console.print(per_class)
    console.print(f"run directory: {run_dir}  ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0
