"""The main job on the built-in synthetic data: synthesize a small challenge (labelled videos and
test videos), shard it, train the fusion model of paper 000 on every fold of a 5-fold
cross-validation on CPU, ensemble the five fold models on the test videos, post-process, write both
submission formats and print the per-fold and ensemble table.

Each stage is skipped when its output is already complete, and finished folds are kept, so a
rerun goes on where the last one stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from fer_dist import config
from fer_dist.affwild2 import discover
from fer_dist.cv import cross_validate
from fer_dist.shard import PackParams, pack
from fer_dist.synth import TEST_LABELS, TEST_LIST, TEST_TEMPLATE

CONFIG = config.CONFIGS / "mfm_cpu.yaml"
EPOCHS = 1  # per fold: 250 steps of 32 frames


def main_job(workdir: Path, videos: int = 24, seed: int = 0, epochs: int | None = None, test_videos: int = 4) -> int:
    from fer_dist.cli import bar, print_report, report

    console = Console()
    started = time.perf_counter()
    data, shards, cv_dir = workdir / "affwild2", workdir / "shards", workdir / "cv"
    if not (data / ".complete").exists():
        from fer_dist.synth import synthesize

        with bar() as progress:
            task = progress.add_task("synthesizing videos", total=videos + test_videos, info="")
            synthesize(data, videos, seed, 2, lambda: progress.advance(task), test_videos=test_videos)
        (data / ".complete").touch()
    if not (shards / "manifest.json").exists():
        vids = discover(data, test_list=data / TEST_LIST)
        with bar() as progress:
            task = progress.add_task("packing videos", total=len(vids), info="")
            manifest = pack(
                vids, shards, PackParams(samples_per_shard=500, seed=seed), 2, lambda _, n: progress.advance(task)
            )
        report(manifest)
    if not CONFIG.exists():
        raise FileNotFoundError(f"{CONFIG} not found: run the demo from a checkout of fer-dist")
    overrides = [f"data.shards={shards}", f"train.seed={seed}", f"train.epochs={epochs or EPOCHS}"]
    result = cross_validate(str(CONFIG), overrides, cv_dir, truth=data / TEST_LABELS, template=data / TEST_TEMPLATE)
    print_report(result)
    test = {r["name"]: r["macro_f1"] for r in result["test"]}
    console.print(
        f"test macro-F1: mean of the fold models {test['mean of members']:.3f}, "
        f"vote ensemble {test['ensemble (vote)']:.3f}, "
        f"with post-processing {test['ensemble (vote) + post-processing']:.3f}"
    )
    console.print(
        f"report: {cv_dir / 'ensemble' / 'report.md'}; submissions: {cv_dir / 'ensemble' / 'submission'}  "
        f"({(time.perf_counter() - started) / 60:.1f} min)"
    )
    return 0
