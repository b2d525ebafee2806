"""Cross-validation on one machine and submissions for the test videos.

`fer-dist cv` resolves the config once per fold group (`data.holdout_fold=k`, the run folder
`<cv dir>/fold{k}`), writes it into the fold's folder and trains it there through
`accelerate launch -m fer_dist.train --resume` (so on whatever GPUs or CPU processes there are),
one fold after another; a fold whose last epoch is done is not trained again, and an interrupted
one resumes from its checkpoint. Then `fer-dist predict` runs every fold's best model over the
test group (`fer_dist.jobs.predict`), and the ensemble combines them. `slurm/cv5.sh` trains the
same fold folders on a cluster and ends with this command, which then finds every fold finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fer_dist.config import ConfigError, dump, load
from fer_dist.console import console
from fer_dist.data.format import read_manifest
from fer_dist.engine import predictions as preds_lib
from fer_dist.engine.checkpoint import REQUEUE_EXIT
from fer_dist.jobs import predict as predict_job
from fer_dist.labels import NUM_CLASSES
from fer_dist.results import ensemble, postprocess, submission


class Interrupted(Exception):
    """A fold stopped on a signal; its checkpoint is on disk and rerunning the command resumes it."""


class RunFailed(Exception):
    """A fold's training or a prediction failed; its own output above says why."""


def launcher(launch: str | None) -> list[str]:
    """`accelerate launch` with a config file, or over every GPU there is, or one process."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch:
        return command + ["--config_file", launch]
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return command + ["--multi_gpu", "--num_processes", str(gpus)]
    single = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # Accelerate starts a lone process with OMP_NUM_THREADS=1 unless told otherwise: on a CPU that
    # halves training speed on two cores; give it every core this process may use.
    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    return command + single + ["--num_cpu_threads_per_process", threads]


def finished(run_dir: Path) -> bool:
    """The run's last epoch was evaluated and its best weights exported."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (metrics.exists() and config.exists() and (run_dir / "checkpoints" / "best" / "metrics.json").exists()):
        return False
    epochs = load(config).train.epochs
    lines = metrics.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1])["epoch"] == epochs


def launch_module(module: str, args: list[str], launch: str | None, what: str, run_dir: Path | None = None) -> None:
    """`python -m module args` through `accelerate launch`; a prediction that would be one process
    anyway runs in this process (skipping a second start of Python and torch)."""
    if module == "fer_dist.jobs.predict" and launch is None and torch.cuda.device_count() <= 1:
        status = predict_job.main(args)
    else:
        status = subprocess.run([*launcher(launch), "-m", module, *args]).returncode
    if status == REQUEUE_EXIT or (run_dir is not None and (run_dir / "requeue.json").exists()):
        raise Interrupted(f"{what} was stopped by a signal; run the same command again to resume it")
    if status:
        raise RunFailed(f"{what} failed with status {status} (see its output above{f'; {run_dir}' if run_dir else ''})")


def train_folds(config: str, overrides: list[str], cv_dir: Path, launch: str | None) -> list[Path]:
    """Each fold's config, resolved here and written into its run folder, trained from there."""
    shards = load(config, overrides).data.shards
    folds = sorted(int(g[4:]) for g in read_manifest(shards).fold_groups())
    if len(folds) < 2:
        raise ConfigError(f"{shards} has {len(folds)} fold group(s); cross-validation needs at least 2")
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
        launch_module("fer_dist.train", ["--resume", str(run_dir)], launch, f"fold {k}", run_dir)
    return runs


def predict_members(specs: list[str], shards: Path, out: Path, launch: str | None, group: str = "test") -> None:
    """`<out>/test/<run>.npz`: each run's best weights over `group` of `shards` (kept when there)."""
    (out / "test").mkdir(parents=True, exist_ok=True)
    for m in ensemble.members(specs):
        best = m.run_dir / "checkpoints" / "best"
        target = out / "test" / f"{m.run_name}.npz"
        if target.exists() and target.stat().st_mtime >= (best / "model.safetensors").stat().st_mtime:
            continue  # predicted by these very weights
        console.print(f"predicting {group} of {shards} with {m.run_dir}")
        args = [str(best), "--shards", str(shards), "--group", group, "--out", str(target)]
        launch_module("fer_dist.jobs.predict", args, launch, f"prediction with {m.name}")


def submit(out: Path, shards: Path, template: Path | None) -> dict:
    """Both submission formats from the post-processed ensemble over the test videos."""
    test = preds_lib.load(out / "test.npz")
    params = postprocess.PostParams.from_dict(json.loads((out / "postprocess.json").read_text()))
    labels = postprocess.apply(test.key, test.logits["ensemble"], params)
    videos = read_manifest(shards).videos
    frames = {v: r.frames for v, r in videos.items() if r.split == "test"}
    required = (
        submission.read_template(template)
        if template
        else [(v, f) for v, n in sorted(frames.items()) for f in range(1, n + 1)]
    )
    files = submission.write_abaw3(out / "submission" / "abaw3", test.key, labels, frames)
    rows = submission.write_abaw5(out / "submission" / "abaw5.csv", test.key, labels, required)
    counts = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    return {"abaw3_files": len(files), "abaw5_rows": rows, "labels": counts}


def predict(
    specs: list[str],
    shards: Path,
    out: Path,
    launch: str | None = None,
    how: str = "vote",
    template: Path | None = None,
    truth: Path | None = None,
) -> dict:
    """The ensemble of `specs` over the test videos of `shards`: report, predictions, submissions."""
    if "test" not in read_manifest(shards).groups:
        raise ConfigError(f"{shards} holds no test videos (pack them with fer-dist shard --test-list)")
    predict_members(specs, shards, out, launch)
    report = ensemble.run(specs, out, how, truth)
    report["submission"] = submit(out, shards, template)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


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
