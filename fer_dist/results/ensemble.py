"""Combining the fold models of a cross-validation (and several models' folds) into one prediction.

Each member is a training run directory. Its validation predictions are those of its best epoch
on its own held-out fold; put end to end over the folds they are the out-of-fold predictions on
which post-processing is tuned. Test predictions (`<out>/test/<run>.npz`, written by `fer-dist
predict`; every path of the output folder is `engine/rundir.py`'s `EnsembleDir`) are combined by
averaging probabilities or by majority vote, as in *Transformer-based Multimodal Information
Fusion for Facial Expression Analysis* and *Multi-modal Expression Recognition with Ensemble
Method*. The report puts per-class F1 of every fold next to the ensemble's, in the layout of the
former's Table 2.

Every member learns the same track (its config's `tracks`); an ensemble of action units averages
the members' AU probabilities and one of valence-arousal their values (`combine`), whatever `how`
says, and the report gives per-AU F1 in the layout of the same paper's Table 1, or the CCC of
valence and arousal and their mean (P_VA). Post-processing (`postprocess.tune_track`) is chosen per
track on the out-of-fold predictions; the test ensemble is decided with what was chosen there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fer_dist.console import console
from fer_dist.console import out as stdout
from fer_dist.data.packing.layout import read_annotation
from fer_dist.data.shards.format import atomic_write, manifest_path
from fer_dist.engine import predictions as preds_lib
from fer_dist.engine import provenance
from fer_dist.engine.evaluation import PARTS
from fer_dist.engine.metrics import track_scores
from fer_dist.engine.rundir import EnsembleDir, RunDir, RunError, runs_of
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, NUM_CLASSES
from fer_dist.results import postprocess
from fer_dist.tracks import ACTION_UNITS, TRACKS

HOW = ("vote", "mean")  # how members are combined (`combine`)


class EnsembleError(InputError):
    """Members that cannot be combined, or predictions that are not there."""


@dataclass(frozen=True)
class Member:
    """One head of one finished run (`head` "" is the model's own output head)."""

    run: RunDir
    head: str = ""

    @property
    def name(self) -> str:
        """The run's name (`cv-fold0`), and the head's when it is not the output."""
        return self.run.name + (f"-{self.head}" if self.head else "")

    @property
    def fold(self) -> int:
        """The fold the run held out (its config's `data.holdout_fold`)."""
        return self.run.config.data.holdout_fold


def members(specs: list[str]) -> list[Member]:
    """`RUN_DIR[:HEAD]` for each spec; a cross-validation directory stands for all its folds. Raises
    EnsembleError when one is not a folder or not a finished run (its best model exported, its
    config there), none is given, or two learn different tracks (`track_of`); ConfigError when a
    run's config does not load."""
    found = []
    for spec in specs:
        path, _, head = spec.partition(":")
        if not Path(path).is_dir():
            raise EnsembleError(f"{path}: no such folder")
        for run in runs_of(path):
            try:
                run.trained()
            except RunError as exc:
                raise EnsembleError(str(exc)) from None
            found.append(Member(run, head))
    if not found:
        raise EnsembleError("no members given")
    track_of(found)
    return found


def track_of(ms: list[Member]) -> str:
    """The track every member learns (its config's `tracks`: expr, au or va). Raises EnsembleError
    naming the first member that learns another track than the first member."""
    learns = {m.name: m.run.config.tracks[0] for m in ms}
    first = ms[0].name
    for name, track in learns.items():
        if track != learns[first]:
            raise EnsembleError(
                f"{name} learns {TRACKS[track].title} but {first} {TRACKS[learns[first]].title}; an ensemble "
                "combines runs of one track"
            )
    return learns[first]


def validation(m: Member) -> preds_lib.Predictions:
    """The member's predictions on its held-out fold at its best epoch."""
    return preds_lib.load(m.run.best_predictions())


def track_values(p: preds_lib.Predictions, track: str, head: str = "", who: str = "") -> np.ndarray:
    """[N, outputs] float64 values of `track` from `head`'s raw outputs (the output head's when ""):
    `Track.values`, softmax probabilities of the classes, sigmoid probabilities of the AUs, tanh
    valence-arousal. Raises EnsembleError, naming `who` (the member), when the predictions have no
    such head or do not hold the track."""
    head = head or p.output
    if head not in p.logits:
        raise EnsembleError(
            f"{who or 'these predictions'}: no head {head!r} in its predictions (they have {', '.join(p.logits)})"
        )
    if track not in p.tracks:
        raise EnsembleError(
            f"{who or 'these predictions'}: its predictions hold {', '.join(p.tracks)}, not {TRACKS[track].title}"
        )
    return p.values(head, track)


def probabilities(p: preds_lib.Predictions, head: str = "", who: str = "") -> np.ndarray:
    """[N, classes] float64 softmax of `head`'s expression logits (`track_values` of expr)."""
    return track_values(p, "expr", head, who)


def ensemble_values(p: preds_lib.Predictions) -> np.ndarray:
    """The combined values an ensemble's predictions (`as_predictions`) hold for their track."""
    track = p.tracks[0]
    return p.logits["ensemble"] if track == "expr" else p.values("ensemble", track)


def as_predictions(
    track: str, keys: np.ndarray, labels: np.ndarray, values: np.ndarray, label: np.ndarray
) -> preds_lib.Predictions:
    """The combined `values` [N, outputs] of `track` as a predictions file keeps them: expression
    probabilities as they are (their argmax the label; files of earlier versions hold the same),
    AU probabilities as their logits, valence-arousal as its atanh, so that `ensemble_values` gives
    them back. `labels`: the track's labels of the frames; `label`: the frames' expressions."""
    if track == "expr":
        return preds_lib.Predictions(keys, labels, {"ensemble": values}, "ensemble")
    raw = TRACKS[track].raw(values)
    return preds_lib.Predictions(keys, label, {"ensemble": raw}, "ensemble", (track,), {track: labels})


def check_how(how: str) -> None:
    """Raises EnsembleError unless `how` is one of HOW."""
    if how not in HOW:
        raise EnsembleError(f"--how must be one of {', '.join(HOW)}, not {how!r}")


def combine(probs: list[np.ndarray], how: str, track: str = "expr") -> np.ndarray:
    """mean: the average probability; vote: each member's label counts once, and a tie goes to the
    class with the higher average probability. Both return rows that sum to 1. Action units and
    valence-arousal (`track`) are averaged whatever `how` says. Raises EnsembleError for another `how`."""
    check_how(how)
    mean = np.mean(probs, axis=0)
    if how == "mean" or track != "expr":
        return mean
    votes = sum(np.eye(NUM_CLASSES)[p.argmax(1)] for p in probs)
    return (votes + mean) / (len(probs) + 1)


def aligned(named: dict[str, preds_lib.Predictions]) -> np.ndarray:
    """The keys all these predictions share; a frame one of them lacks is an error."""
    (first, p0), *rest = named.items()
    for name, p in rest:
        if len(p.key) != len(p0.key) or not np.array_equal(p.key, p0.key):
            missing = np.setdiff1d(p0.key, p.key)
            extra = np.setdiff1d(p.key, p0.key)
            example = missing[0] if len(missing) else extra[0] if len(extra) else "(order)"
            raise EnsembleError(
                f"{name} and {first} predict different frames: {len(missing)} missing, {len(extra)} extra, "
                f"e.g. {example}"
            )
    return p0.key


def truth_labels(keys: np.ndarray, truth: Path, track: str = "expr") -> np.ndarray:
    """Labels of `track` of these frames from annotation files `<truth>/<video>.txt`, in the track's
    convention (`missing` where not annotated or past the file's end). Raises EnsembleError for a
    video without a file, LayoutError for a file that is not one of the track's."""
    t = TRACKS[track]
    labels = np.full(len(keys), -1, np.int64) if track == "expr" else t.empty(len(keys))
    videos, frames = preds_lib.split_keys(keys)
    for video in np.unique(videos):
        path = truth / f"{video}.txt"
        if not path.exists():
            raise EnsembleError(f"--truth {truth}: no annotation file for test video {video}")
        annotated = read_annotation(path, t)
        rows = np.flatnonzero(videos == video)
        inside = frames[rows] <= len(annotated)
        labels[rows[inside]] = annotated[frames[rows[inside]] - 1]
    return labels


def row(name: str, labels: np.ndarray, predicted: np.ndarray, track: str = "expr", **extra) -> dict:
    """One row of the report: the track's parts (`per_class_f1`, `per_au_f1` or `ccc`) and metric
    (`macro_f1`, `au_f1` or `p_va`) of `predicted` against `labels` (`metrics.track_scores`)."""
    t = TRACKS[track]
    scored = track_scores(t, labels, predicted)
    return {"name": name, PARTS[track]: list(scored["parts"].values()), t.metric: scored[t.metric], **extra}


@dataclass
class Ensemble:
    """What an ensemble's folder receives, computed in full before any of it is written."""

    report: dict  # report.json (and report.md): per-fold and combined rows, post-processing, test rows
    validation: preds_lib.Predictions  # the out-of-fold predictions, every labelled frame once
    test: preds_lib.Predictions | None  # the combined test predictions, when every member has its own
    params: postprocess.PostParams  # post-processing tuned on `validation`
    tuned: dict  # postprocess.json: `params` and the out-of-fold metric (macro-F1, ...) before and after them
    record: dict  # provenance.json's record: each member's seed, config and shards


def check_out(out: EnsembleDir) -> None:
    """Raises EnsembleError when `out` holds a training run or shards, whose own files an ensemble's
    (provenance.json, postprocess.json, ...) would replace."""
    if RunDir(out.path).holds_run() or manifest_path(out.path).exists():
        what = "shards" if manifest_path(out.path).exists() else "a training run"
        raise EnsembleError(f"--out {out.path} holds {what}; write the ensemble into a folder of its own")


def out_of_fold(ms: list[Member], track: str, how: str) -> tuple[preds_lib.Predictions, list[dict]]:
    """Each fold's members combined on their held-out fold (`combine`), the folds put end to end and
    sorted by key (`as_predictions`), with each member's row (`row`; action units at 0.5). Raises
    EnsembleError when members of one fold predict different frames or two folds the same frame."""
    t = TRACKS[track]
    val = {m.name: validation(m) for m in ms}
    member_values = {m.name: track_values(val[m.name], track, m.head, m.name) for m in ms}
    folds: dict[int, list[Member]] = {}
    for m in ms:
        folds.setdefault(m.fold, []).append(m)
    keys, labels, values, expressions, fold_rows = [], [], [], [], []
    for fold, group in sorted(folds.items()):
        keys.append(aligned({m.name: val[m.name] for m in group}))
        labels.append(val[group[0].name].labels(track))
        expressions.append(val[group[0].name].label)
        values.append(combine([member_values[m.name] for m in group], how, track))
        fold_rows += [row(m.name, labels[-1], t.decide(member_values[m.name]), track, fold=fold) for m in group]
    order = np.argsort(np.concatenate(keys), kind="stable")
    keys = np.concatenate(keys)[order]
    if len(np.unique(keys)) != len(keys):
        raise EnsembleError("the members' held-out folds overlap: a frame is validated by two folds")
    labels, values = np.concatenate(labels)[order], np.concatenate(values)[order]
    return as_predictions(track, keys, labels, values, np.concatenate(expressions)[order]), fold_rows


def combined(ms: list[Member], out: EnsembleDir, how: str = "vote", truth: Path | None = None) -> Ensemble:
    """Combines the members (`members`, all of one track) by `how` (`combine`; action units and
    valence-arousal by their mean) on their held-out folds, tunes post-processing on the
    out-of-fold predictions (`postprocess.tune_track`), and, when every member has test predictions
    in `out` (`EnsembleDir.member_test`), combines those and scores them against `truth` (a folder
    of the track's annotation files). Writes nothing; raises EnsembleError for members that cannot
    be combined."""
    if truth is not None and not Path(truth).is_dir():
        raise EnsembleError(f"--truth {truth}: not a folder of annotation files")
    check_how(how)
    track = track_of(ms)
    t, how = TRACKS[track], how if track == "expr" else "mean"
    oof, fold_rows = out_of_fold(ms, track, how)
    keys, labels, values = oof.key, oof.labels(track), ensemble_values(oof)
    params, before, after = postprocess.tune_track(track, keys, values, labels)
    report = {
        "how": how,
        "members": [m.name for m in ms],
        "validation": fold_rows
        + [
            row("out-of-fold", labels, t.decide(values), track),
            row("out-of-fold + post-processing", labels, postprocess.apply(keys, values, params), track),
        ],
        "postprocess": params.to_dict(),
    }
    if track != "expr":  # an expression report reads as it always has
        report = {"track": track, **report}
    test = None
    if all(out.member_test(m.run).exists() for m in ms):
        test, report["test"] = test_report(ms, how, params, out, truth, fold_rows)
    elif truth is not None:
        console.print(f"[yellow]warning:[/] --truth {truth} is unused: no test predictions in {out.path}")
    return Ensemble(
        report,
        oof,
        test,
        params,
        {**params.to_dict(), f"validation_{t.metric}_before": before, f"validation_{t.metric}_after": after},
        provenance.record(["cpu"], 1, **provenance.of_runs([m.run for m in ms])),
    )


def write(e: Ensemble, out: EnsembleDir) -> None:
    """`validation.npz`, `test.npz` (when there are test predictions), `postprocess.json`,
    `report.json`, `report.md` and `provenance.json` in `out`, each file atomically."""
    out.path.mkdir(parents=True, exist_ok=True)
    preds_lib.save(out.validation, e.validation)
    if e.test is not None:
        preds_lib.save(out.test, e.test)
    atomic_write(out.postprocess, json.dumps(e.tuned).encode())
    atomic_write(out.report, json.dumps(e.report, indent=1).encode())
    atomic_write(out.report_md, markdown(e.report).encode())
    provenance.write(out.path, e.record)


def run(ms: list[Member], out: Path, how: str = "vote", truth: Path | None = None) -> dict:
    """`fer-dist ensemble`: the members combined (`combined`) and written into the folder `out`
    (`write`); returns the report. Everything is computed, and any refusal raised, before the first
    file is written."""
    folder = EnsembleDir(out)
    check_out(folder)
    result = combined(ms, folder, how, truth)
    write(result, folder)
    return result.report


def test_report(
    ms: list[Member], how, params: postprocess.PostParams, out: EnsembleDir, truth: Path | None, fold_rows
) -> tuple[preds_lib.Predictions, list[dict]]:
    """Combines the members' test predictions (`EnsembleDir.member_test`, one file for all heads of
    a run) into the ensemble's; with the true labels, scores each member, their mean and the
    ensemble before and after post-processing (`params`, chosen on the out-of-fold predictions)."""
    track = params.track
    t, parts = TRACKS[track], PARTS[track]
    test = {m.run.name: preds_lib.load(out.member_test(m.run)) for m in ms}
    keys = aligned(test)
    member_values = {m.name: track_values(test[m.run.name], track, m.head, m.name) for m in ms}
    first = test[ms[0].run.name]
    labels = truth_labels(keys, truth, track) if truth else first.labels(track)
    combined = as_predictions(track, keys, labels, combine(list(member_values.values()), how, track), first.label)
    values = ensemble_values(combined)
    if not t.annotated(labels).any():
        return combined, []
    held_out = {r["name"]: r[t.metric] for r in fold_rows}
    rows = [
        row(m.name, labels, t.decide(member_values[m.name]), track, **{f"validation_{t.metric}": held_out[m.name]})
        for m in ms
    ]
    mean = np.mean([r[parts] for r in rows], axis=0)
    rows.append(
        {
            "name": "mean of members",
            parts: mean.round(6).tolist(),
            t.metric: float(np.mean([r[t.metric] for r in rows])),
        }
    )
    rows.append(row(f"ensemble ({how})", labels, t.decide(values), track))
    rows.append(row(f"ensemble ({how}) + post-processing", labels, postprocess.apply(keys, values, params), track))
    return combined, rows


COLUMNS = {"expr": CLASSES, "au": ACTION_UNITS, "va": ("CCC valence", "CCC arousal")}  # a table's parts
AVERAGE = {"expr": "Avg.", "au": "Avg.", "va": "mean"}  # the column of the track's metric
SAYS = {
    "expr": "Expression F1 (%) of each fold model on its held-out videos:",
    "au": (
        "Action-unit F1 (%) of each fold model on its held-out videos, in the layout of Table 1 of "
        "*Transformer-based Multimodal Information Fusion for Facial Expression Analysis* (each AU on from "
        "a probability of 0.5; after post-processing, from its own threshold):"
    ),
    "va": "Concordance (CCC) of valence and arousal of each fold model on its held-out videos, and their mean (P_VA):",
}


def cells(track: str, r: dict) -> list[str]:
    """A row's parts and metric as the tables show them: F1 in %, or CCC."""
    shown = (lambda v: f"{v:.3f}") if track == "va" else (lambda v: f"{100 * v:.1f}")
    return [*(shown(v) for v in r[PARTS[track]]), shown(r[TRACKS[track].metric])]


def markdown(report: dict) -> str:
    """The report's tables: the track's parts (per-class F1 in %, per-AU F1 in %, or the CCC of each
    dimension) one row per fold, then the combined rows; the test rows apart."""
    track = report.get("track", "expr")
    metric = TRACKS[track].metric

    def table(title: str, rows: list[dict], extra: bool) -> list[str]:
        head = [title, *COLUMNS[track], AVERAGE[track]] + ([f"validation {AVERAGE[track]}"] if extra else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            *parts, average = cells(track, r)
            row_cells = [r["name"], *parts, f"**{average}**"]
            if extra:
                v = r.get(f"validation_{metric}")
                row_cells.append(cells(track, {PARTS[track]: [], metric: v})[-1] if v is not None else "")
            lines.append("| " + " | ".join(row_cells) + " |")
        return lines

    p = report["postprocess"]
    lines = [
        f"# Cross-validation ensemble ({report['how']}, {len(report['members'])} members)",
        "",
        SAYS[track],
        "",
        *table("Val set", report["validation"], False),
        "",
        f"Post-processing chosen on the out-of-fold predictions: {postprocess.describe(p)}.",
    ]
    if report.get("test"):
        lines += ["", "On the test videos:", "", *table("Test set", report["test"], True)]
    return "\n".join(lines) + "\n"


def show(report: dict) -> None:
    """The report's tables, as in report.md, at least 120 columns wide (170 for the 12 AUs)."""
    track = report.get("track", "expr")
    wide = Console(width=max(stdout.size.width, 170 if track == "au" else 120))
    sections = [("each fold on its held-out videos", report["validation"])]
    if report.get("test"):
        sections.append(("the test videos", report["test"]))
    columns = [c[:3] for c in CLASSES] if track == "expr" else ["V", "A"] if track == "va" else list(ACTION_UNITS)
    for title, rows in sections:
        table = Table(title=title)
        table.add_column("", no_wrap=True)
        for col in (*columns, AVERAGE[track]):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["name"], *cells(track, r))
        wide.print(table)
    stdout.print(f"post-processing: {postprocess.describe(report['postprocess'])}")
    if "submission" in report:
        s = report["submission"]
        stdout.print(f"submissions: {s['abaw3_files']} ABAW3 files, {s['abaw5_rows']} ABAW5/6 rows")
