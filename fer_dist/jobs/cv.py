"""Cross-validation on one machine and submissions for the test videos.

`fer-dist cv` gives each fold group its own run in the cross-validation folder
(`CrossValidation.fold(k)`: the config once resolved, with `data.holdout_fold` = k and that
folder as its `train.run_dir`), writes the fold's config there and trains it through
`accelerate launch -m fer_dist.train --resume` (so on whatever GPUs or CPU processes there are),
one fold after another; a fold whose last epoch is done is not trained again, and an interrupted
one resumes from its checkpoint. Then, with test videos in the shards, `fer_dist.jobs.predict`
runs every fold's best model over them, ensembles and writes the submissions of the config's track
(`tracks`: expressions, action units or valence-arousal). `slurm/cv5.sh` trains the
same fold folders on a cluster and ends with this command, which then finds every fold finished.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fer_dist.config import Config, ConfigError
from fer_dist.console import console
from fer_dist.data.shards.format import Manifest, read_manifest
from fer_dist.engine.rundir import CrossValidation, RunDir
from fer_dist.jobs.launch import run_module
from fer_dist.jobs.predict import predict
from fer_dist.results import ensemble


def fold_config(cfg: Config, k: int, run: RunDir) -> Config:
    """`cfg` for fold `k`: that fold group held out, trained into `run`."""
    data = dataclasses.replace(cfg.data, holdout_fold=k)
    return dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, run_dir=str(run.path)))


def train_folds(cfg: Config, manifest: Manifest, cv: CrossValidation, launch: str | None) -> list[RunDir]:
    """Each fold's config, resolved here and written into its run folder, trained from there.
    Raises ConfigError, before any fold is trained, for shards with fewer than two folds or one
    without a frame of the run's track."""
    folds = manifest.folds()
    if len(folds) < 2:
        raise ConfigError(f"{cfg.data.shards} has {len(folds)} fold group(s); cross-validation needs at least 2")
    empty = manifest.empty(manifest.fold_groups(), tuple(cfg.tracks))
    if empty:  # every fold is checked before any is trained
        raise ConfigError(
            f"{cfg.data.shards}: cross-validation holds out every fold group, but {empty}; pack with fewer "
            "--n-folds, or give those videos crops, then pack again"
        )
    runs = []
    for k in folds:
        run = cv.fold(k)
        runs.append(run)
        if run.finished():
            console.print(f"fold {k}: finished, kept ({run.path})")
            continue
        console.print(f"[bold]fold {k}[/] of {len(folds)}: training into {run.path}")
        run.write_config(fold_config(cfg, k, run))
        run_module("fer_dist.train", ["--resume", str(run.path)], launch, f"fold {k}", run)
    return runs


def cross_validate(
    cfg: Config,
    cv_dir: Path,
    launch: str | None = None,
    how: str = "vote",
    template: Path | None = None,
    truth: Path | None = None,
) -> dict:
    """Every fold of `cfg`'s shards trained into `cv_dir`, then the ensemble; with test videos in the
    shards, their predictions and submissions. Returns the ensemble's report."""
    cv = CrossValidation(cv_dir)
    manifest = read_manifest(cfg.data.shards)
    train_folds(cfg, manifest, cv, launch)
    shards = Path(cfg.data.shards)
    if "test" in manifest.groups:
        return predict([str(cv.path)], shards, cv.ensemble.path, launch, how, template, truth)
    return ensemble.run(ensemble.members([str(cv.path)]), cv.ensemble.path, how, truth)
