"""Cross-validation on one machine and submissions for the test videos.

`fer-dist cv` resolves the config once per fold group (`data.holdout_fold=k`, the run folder
`<cv dir>/fold{k}`), writes it into the fold's folder and trains it there through
`accelerate launch -m fer_dist.train --resume` (so on whatever GPUs or CPU processes there are),
one fold after another; a fold whose last epoch is done is not trained again, and an interrupted
one resumes from its checkpoint. Then, with test videos in the shards, `fer_dist.jobs.predict`
runs every fold's best model over them, ensembles and writes the submissions. `slurm/cv5.sh` trains the
same fold folders on a cluster and ends with this command, which then finds every fold finished.
"""

from __future__ import annotations

import json
from pathlib import Path

from fer_dist.config import ConfigError, dump, load
from fer_dist.console import console
from fer_dist.data.shards.format import read_manifest
from fer_dist.jobs.launch import run_module
from fer_dist.jobs.predict import predict
from fer_dist.results import ensemble


def finished(run_dir: Path) -> bool:
    """The run's last epoch was evaluated and its best weights exported."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (metrics.exists() and config.exists() and (run_dir / "checkpoints" / "best" / "metrics.json").exists()):
        return False
    epochs = load(config).train.epochs
    lines = metrics.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1])["epoch"] == epochs


def train_folds(config: str, overrides: list[str], cv_dir: Path, launch: str | None) -> list[Path]:
    """Each fold's config, resolved here and written into its run folder, trained from there."""
    shards = load(config, overrides).data.shards
    manifest = read_manifest(shards)
    folds = sorted(int(g[4:]) for g in manifest.fold_groups())
    if len(folds) < 2:
        raise ConfigError(f"{shards} has {len(folds)} fold group(s); cross-validation needs at least 2")
    empty = manifest.empty(manifest.fold_groups())
    if empty:  # every fold is checked before any is trained
        raise ConfigError(
            f"{shards}: cross-validation holds out every fold group, but {empty}; pack with fewer --n-folds, "
            "or give those videos crops, then pack again"
        )
    runs = []
    for k in folds:
        run_dir = cv_dir / f"fold{k}"
        runs.append(run_dir)
        if finished(run_dir):
            console.print(f"fold {k}: finished, kept ({run_dir})")
            continue
        console.print(f"[bold]fold {k}[/] of {len(folds)}: training into {run_dir}")
        fold = load(config, [*overrides, f"data.holdout_fold={k}", f"train.run_dir={run_dir}"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump(fold))
        run_module("fer_dist.train", ["--resume", str(run_dir)], launch, f"fold {k}", run_dir)
    return runs


def cross_validate(
    config: str,
    overrides: list[str],
    cv_dir: Path,
    launch: str | None = None,
    how: str = "vote",
    template: Path | None = None,
    truth: Path | None = None,
) -> dict:
    """Every fold, then the ensemble; with test videos in the shards, their predictions and submissions."""
    overrides = [*overrides, f"train.run_dir={cv_dir}"]
    train_folds(config, overrides, cv_dir, launch)
    shards = Path(load(config, overrides).data.shards)
    out = cv_dir / "ensemble"
    if "test" in read_manifest(shards).groups:
        return predict([str(cv_dir)], shards, out, launch, how, template, truth)
    return ensemble.run([str(cv_dir)], out, how, truth)
