"""Predictions for the test videos: each model's, then the ensemble's, then the submission files.

One trained model over every frame of a shard group, on any number of processes, is this
module's own entry point:

    accelerate launch -m fer_dist.jobs.predict RUN/checkpoints/best --shards SHARDS --group test --out OUT.npz

The weights folder is a run's exported model (`model.safetensors` with the `config.yaml` that
builds it); every frame of the group is predicted once over all ranks and rank 0 writes the
predictions file (`engine/predictions.py`). `fer-dist predict` (and `fer-dist cv` after its
folds) runs it for each member into `<out>/test/<run>.npz`, ensembles the members, post-processes
and writes both ABAW submission formats of the members' track (expressions, action units or
valence-arousal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fer_dist.config import ConfigError
from fer_dist.console import console, progress
from fer_dist.data.shards.format import atomic_write, manifest_path, read_manifest, sample_key
from fer_dist.engine import predictions as preds_lib
from fer_dist.engine.distributed import make_accelerator
from fer_dist.engine.evaluation import evaluate
from fer_dist.engine.provenance import sha256
from fer_dist.engine.rundir import EnsembleDir, TrainedModel
from fer_dist.engine.task import Task
from fer_dist.errors import InputError, one_line
from fer_dist.jobs.launch import run_module
from fer_dist.labels import NUM_CLASSES
from fer_dist.results import ensemble, postprocess, submission
from fer_dist.tracks import ACTION_UNITS, TRACKS


def predict_group(trained: TrainedModel, shards: Path, group: str, out: Path) -> dict | None:
    """`out`: the predictions of the `trained` model for every frame of `group`; returns rank 0's
    scores (meaningless for an unlabelled group), None on other ranks. Raises ConfigError for an
    empty group or shards that do not hold what the model takes."""
    cfg = trained.config(shards)
    accelerator = make_accelerator(cfg)
    manifest = read_manifest(shards)
    empty = manifest.empty([group], tuple(cfg.tracks))
    if empty:
        raise ConfigError(f"{shards}: {empty}; there is nothing to predict")
    model = trained.load(cfg, manifest)
    model.to(accelerator.device)
    try:
        with progress(accelerator.is_main_process) as bar:
            return evaluate(accelerator, model, Task(cfg, manifest, model), manifest, group, out, bar)
    finally:
        accelerator.end_training()  # the process group closed on every rank before any exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="an exported model: a folder with model.safetensors and config.yaml")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--group", default="test", help="the shard group to predict (test, fold0, ...)")
    parser.add_argument("--out", required=True, help="the predictions file (.npz) to write")
    args = parser.parse_args(argv)
    try:
        metrics = predict_group(TrainedModel(Path(args.weights)), Path(args.shards), args.group, Path(args.out))
    except (InputError, OSError) as exc:
        console.print(f"[red]error:[/] {one_line(exc)}", soft_wrap=True)
        return 2
    if metrics is not None:
        metric = TRACKS[metrics["track"]].metric  # the model's track: macro_f1, au_f1 or p_va
        scored = f"; {metric} by head {json.dumps(metrics[f'{metric}_by_head'])}" if args.group != "test" else ""
        console.print(f"{args.out}: {metrics['eval_frames']} frames{scored}")
    return 0


def predict_members(
    ms: list[ensemble.Member], shards: Path, out: EnsembleDir, launch: str | None, group: str = "test"
) -> None:
    """Each member run's test predictions (`EnsembleDir.member_test`): its best weights over `group`
    of `shards`, kept from an earlier prediction only when that was made by these very weights from
    these very shards (`EnsembleDir.member_stamp`: the SHA-256 of both)."""
    for m in ms:
        trained, target, stamp = m.run.trained(), out.member_test(m.run), out.member_stamp(m.run)
        made_from = {"weights": sha256(trained.weights), "shards": sha256(manifest_path(shards))}
        if target.exists() and stamp.exists() and json.loads(stamp.read_text()) == made_from:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"predicting {group} of {shards} with {m.run.path}")
        args = [str(trained.path), "--shards", str(shards), "--group", group, "--out", str(target)]
        run_module("fer_dist.jobs.predict", args, launch, f"prediction with {m.name}", here=main)
        atomic_write(stamp, json.dumps(made_from).encode())


def required_frames(
    shards: Path, template: Path | None, track: str = "expr"
) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Each test video's frame count (ABAW3: one line per frame) and the (video, frame) rows of the
    ABAW5/6 file (the template's, else every frame of every test video), checked against what the
    shards hold before any prediction is made. A row of a video the test shards do not hold in
    full is refused, naming why; a template row past its video's last frame (a template one line
    longer than the video, as annotation files often are) is warned about: it takes the label of
    the video's last frame. The template must be one of `track`'s (`submission.read_template`)."""
    videos = read_manifest(shards).videos
    frames = {v: r.frames for v, r in videos.items() if r.split == "test"}
    required = (
        submission.read_template(template, track)
        if template
        else [(v, f) for v, n in sorted(frames.items()) for f in range(1, n + 1)]
    )
    short = {v for v, r in videos.items() if r.split == "test" and r.samples < r.frames}
    unknown = sorted({v for v, _ in required if v not in frames})
    missing = [sample_key(v, f) for v, f in required if v not in frames or v in short]
    missing += [sample_key(v, f) for v in sorted(short) for f in range(1, frames[v] + 1)]
    if missing:
        reasons = [f"{v}: {videos[v].samples} of its {frames[v]} frames packed" for v in sorted(short)]
        if unknown:
            reasons.append(f"{len(unknown)} video(s) not among the test videos of the shards, e.g. {unknown[0]}")
        raise submission.SubmissionError(
            f"refusing to predict: the test shards {shards} cannot give {len(set(missing))} required frame(s), "
            f"e.g. {', '.join(sorted(set(missing))[:3])} ({'; '.join(reasons)})"
        )
    past = [(v, f) for v, f in required if f > frames[v]]
    if past:
        v, f = past[0]
        console.print(
            f"[yellow]warning:[/] {len(past)} template row(s) lie past their video's last frame (e.g. "
            f"{sample_key(v, f)} of a {frames[v]}-frame video); each takes the label of its video's last frame"
        )
    return frames, required


def submission_files(
    test: preds_lib.Predictions, params: postprocess.PostParams, frames: dict[str, int], required: list[tuple[str, int]]
) -> tuple[dict[str, bytes], dict]:
    """Both submission formats of the track `params` post-processes (file name -> bytes) from the
    ensemble's `test` predictions (`ensemble.ensemble_values`) post-processed with `params`, and
    what they hold (the frames per class, or each AU's frames on); raises SubmissionError when a
    required frame has no prediction. Writes nothing (`submission.write` does)."""
    track = params.track
    labels = postprocess.apply(test.key, ensemble.ensemble_values(test), params)
    files = {f"abaw3/{name}": data for name, data in submission.abaw3(test.key, labels, frames, track).items()}
    within = [(v, min(f, frames.get(v, f))) for v, f in required]  # a row past a video's end: its last frame
    files["abaw5.csv"] = submission.abaw5(test.key, labels, within, named=required, track=track)
    made = {"abaw3_files": len(files) - 1, "abaw5_rows": len(required)}
    if track == "expr":
        made["labels"] = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    elif track == "au":
        made["au_on"] = dict(zip(ACTION_UNITS, labels.sum(0).tolist(), strict=True))
    return files, made


def predict(
    specs: list[str],
    shards: Path,
    out: Path,
    launch: str | None = None,
    how: str = "vote",
    template: Path | None = None,
    truth: Path | None = None,
) -> dict:
    """The ensemble of `specs` over the test videos of `shards` in the ensemble folder `out`: each
    member's test predictions (`predict_members`), then the report, the combined predictions and
    both submission formats. The test videos, the template, the members, the truth and `out` are
    checked before any prediction is made, and the submission files are made in full before the
    ensemble's files are written: a refusal leaves `out` as it was, but for the members' own
    predictions. Raises ConfigError, SubmissionError or EnsembleError."""
    manifest = read_manifest(shards)
    if "test" not in manifest.groups:
        raise ConfigError(f"{shards} holds no test videos (pack them with fer-dist shard --test-list)")
    if manifest.empty(["test"]):
        raise ConfigError(f"{shards}: {manifest.empty(['test'])}; there is nothing to predict")
    ms = ensemble.members(specs)  # every member a finished run of one track, before anything is written
    frames, required = required_frames(shards, template, ensemble.track_of(ms))
    if truth is not None and not Path(truth).is_dir():
        raise ConfigError(f"--truth {truth}: not a folder of annotation files")
    folder = EnsembleDir(out)
    ensemble.check_out(folder)
    predict_members(ms, shards, folder, launch)
    result = ensemble.combined(ms, folder, how, truth)
    files, result.report["submission"] = submission_files(result.test, result.params, frames, required)
    submission.write(folder.submission, files)
    ensemble.write(result, folder)
    return result.report


if __name__ == "__main__":
    sys.exit(main())
