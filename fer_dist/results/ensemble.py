"""Combining the fold models of a cross-validation (and several models' folds) into one prediction.

Each member is a training run directory. Its validation predictions are those of its best epoch
on its own held-out fold; put end to end over the folds they are the out-of-fold predictions on
which post-processing is tuned. Test predictions (`<out>/test/<run>.npz`, written by `fer-dist
predict`; every path of the output folder is `engine/rundir.py`'s `EnsembleDir`) are combined by
averaging probabilities or by majority vote, as in *Transformer-based Multimodal Information
Fusion for Facial Expression Analysis* and *Multi-modal Expression Recognition with Ensemble
Method*. The report puts per-class F1 of every fold next to the ensemble's, in the layout of the
former's Table 2.
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
from fer_dist.engine.metrics import confusion, f1_per_class
from fer_dist.engine.rundir import EnsembleDir, RunDir, RunError, runs_of
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, NUM_CLASSES
from fer_dist.results import postprocess

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
    config there), or none is given; ConfigError when a run's config does not load."""
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
    return found


def validation(m: Member) -> preds_lib.Predictions:
    """The member's predictions on its held-out fold at its best epoch."""
    return preds_lib.load(m.run.best_predictions())


def probabilities(p: preds_lib.Predictions, head: str = "", who: str = "") -> np.ndarray:
    """[N, classes] float64 softmax of `head`'s logits (the output head's when ""); raises
    EnsembleError, naming `who` (the member), when the predictions have no such head."""
    head = head or p.output
    if head not in p.logits:
        raise EnsembleError(
            f"{who or 'these predictions'}: no head {head!r} in its predictions (they have {', '.join(p.logits)})"
        )
    z = p.logits[head].astype(np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def check_how(how: str) -> None:
    """Raises EnsembleError unless `how` is one of HOW."""
    if how not in HOW:
        raise EnsembleError(f"--how must be one of {', '.join(HOW)}, not {how!r}")


def combine(probs: list[np.ndarray], how: str) -> np.ndarray:
    """mean: the average probability; vote: each member's label counts once, and a tie goes to the
    class with the higher average probability. Both return rows that sum to 1. Raises EnsembleError
    for another `how`."""
    check_how(how)
    mean = np.mean(probs, axis=0)
    if how == "mean":
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


def truth_labels(keys: np.ndarray, truth: Path) -> np.ndarray:
    """Labels of these frames from annotation files `<truth>/<video>.txt` (-1 where not annotated)."""
    labels = np.full(len(keys), -1, np.int64)
    videos, frames = preds_lib.split_keys(keys)
    for video in np.unique(videos):
        path = truth / f"{video}.txt"
        if not path.exists():
            raise EnsembleError(f"--truth {truth}: no annotation file for test video {video}")
        track = read_annotation(path).astype(np.int64)
        rows = np.flatnonzero(videos == video)
        inside = frames[rows] <= len(track)
        labels[rows[inside]] = track[frames[rows[inside]] - 1]
    return labels


def row(name: str, labels: np.ndarray, predicted: np.ndarray, **extra) -> dict:
    f1 = f1_per_class(confusion(labels, predicted))
    return {"name": name, "per_class_f1": f1.round(6).tolist(), "macro_f1": float(f1.mean()), **extra}


@dataclass
class Ensemble:
    """What an ensemble's folder receives, computed in full before any of it is written."""

    report: dict  # report.json (and report.md): per-fold and combined rows, post-processing, test rows
    validation: preds_lib.Predictions  # the out-of-fold predictions, every labelled frame once
    test: preds_lib.Predictions | None  # the combined test predictions, when every member has its own
    params: postprocess.PostParams  # post-processing tuned on `validation`
    tuned: dict  # postprocess.json: `params` and the out-of-fold macro-F1 before and after them
    record: dict  # provenance.json's record: each member's seed, config and shards


def check_out(out: EnsembleDir) -> None:
    """Raises EnsembleError when `out` holds a training run or shards, whose own files an ensemble's
    (provenance.json, postprocess.json, ...) would replace."""
    if RunDir(out.path).holds_run() or manifest_path(out.path).exists():
        what = "shards" if manifest_path(out.path).exists() else "a training run"
        raise EnsembleError(f"--out {out.path} holds {what}; write the ensemble into a folder of its own")


def combined(ms: list[Member], out: EnsembleDir, how: str = "vote", truth: Path | None = None) -> Ensemble:
    """Combines the members (`members`) by `how` (`combine`) on their held-out folds, tunes
    post-processing on the out-of-fold predictions, and, when every member has test predictions in
    `out` (`EnsembleDir.member_test`), combines those and scores them against `truth`. Writes
    nothing; raises EnsembleError for members that cannot be combined."""
    if truth is not None and not Path(truth).is_dir():
        raise EnsembleError(f"--truth {truth}: not a folder of annotation files")
    val = {m.name: validation(m) for m in ms}
    member_probs = {m.name: probabilities(val[m.name], m.head, m.name) for m in ms}
    folds: dict[int, list[Member]] = {}
    for m in ms:
        folds.setdefault(m.fold, []).append(m)
    keys, labels, probs, fold_rows = [], [], [], []
    for fold, group in sorted(folds.items()):
        keys.append(aligned({m.name: val[m.name] for m in group}))
        labels.append(val[group[0].name].label.astype(np.int64))
        probs.append(combine([member_probs[m.name] for m in group], how))
        fold_rows += [row(m.name, labels[-1], member_probs[m.name].argmax(1), fold=fold) for m in group]
    keys, labels, probs = np.concatenate(keys), np.concatenate(labels), np.concatenate(probs)
    order = np.argsort(keys, kind="stable")
    keys, labels, probs = keys[order], labels[order], probs[order]
    if len(np.unique(keys)) != len(keys):
        raise EnsembleError("the members' held-out folds overlap: a frame is validated by two folds")
    params, before, after = postprocess.tune(keys, probs, labels)
    report = {
        "how": how,
        "members": [m.name for m in ms],
        "validation": fold_rows
        + [
            row("out-of-fold", labels, probs.argmax(1)),
            row("out-of-fold + post-processing", labels, postprocess.apply(keys, probs, params)),
        ],
        "postprocess": params.to_dict(),
    }
    test = None
    if all(out.member_test(m.run).exists() for m in ms):
        test, report["test"] = test_report(ms, how, params, out, truth, fold_rows)
    elif truth is not None:
        console.print(f"[yellow]warning:[/] --truth {truth} is unused: no test predictions in {out.path}")
    return Ensemble(
        report,
        preds_lib.Predictions(keys, labels, {"ensemble": probs}, "ensemble"),
        test,
        params,
        {**params.to_dict(), "validation_macro_f1_before": before, "validation_macro_f1_after": after},
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
    ms: list[Member], how, params, out: EnsembleDir, truth: Path | None, fold_rows
) -> tuple[preds_lib.Predictions, list[dict]]:
    """Combines the members' test predictions (`EnsembleDir.member_test`, one file for all heads of
    a run) into the ensemble's; with the true labels, scores each member, their mean and the
    ensemble before and after post-processing."""
    test = {m.run.name: preds_lib.load(out.member_test(m.run)) for m in ms}
    keys = aligned(test)
    member_probs = {m.name: probabilities(test[m.run.name], m.head, m.name) for m in ms}
    probs = combine(list(member_probs.values()), how)
    labels = truth_labels(keys, truth) if truth else test[ms[0].run.name].label.astype(np.int64)
    combined = preds_lib.Predictions(keys, labels, {"ensemble": probs}, "ensemble")
    if not (labels >= 0).any():
        return combined, []
    validation_f1 = {r["name"]: r["macro_f1"] for r in fold_rows}
    rows = [row(m.name, labels, member_probs[m.name].argmax(1), validation_macro_f1=validation_f1[m.name]) for m in ms]
    mean = np.mean([r["per_class_f1"] for r in rows], axis=0)
    rows.append(
        {
            "name": "mean of members",
            "per_class_f1": mean.round(6).tolist(),
            "macro_f1": float(np.mean([r["macro_f1"] for r in rows])),
        }
    )
    rows.append(row(f"ensemble ({how})", labels, probs.argmax(1)))
    rows.append(row(f"ensemble ({how}) + post-processing", labels, postprocess.apply(keys, probs, params)))
    return combined, rows


def markdown(report: dict) -> str:
    """The report's tables: per-class F1 in %, one row per fold, then the combined rows."""

    def table(title: str, rows: list[dict], extra: bool) -> list[str]:
        head = [title, *CLASSES, "Avg."] + (["validation Avg."] if extra else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["name"], *(f"{100 * v:.1f}" for v in r["per_class_f1"]), f"**{100 * r['macro_f1']:.1f}**"]
            if extra:
                v = r.get("validation_macro_f1")
                cells.append(f"{100 * v:.1f}" if v is not None else "")
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    p = report["postprocess"]
    lines = [
        f"# Cross-validation ensemble ({report['how']}, {len(report['members'])} members)",
        "",
        "Expression F1 (%) of each fold model on its held-out videos:",
        "",
        *table("Val set", report["validation"], False),
        "",
        f"Post-processing chosen on the out-of-fold predictions: {postprocess.describe(p)}.",
    ]
    if report.get("test"):
        lines += ["", "On the test videos:", "", *table("Test set", report["test"], True)]
    return "\n".join(lines) + "\n"


def show(report: dict) -> None:
    """The report's tables (per-class F1 in %), as in report.md, at least 120 columns wide."""
    wide = Console(width=max(stdout.size.width, 120))
    sections = [("each fold on its held-out videos", report["validation"])]
    if report.get("test"):
        sections.append(("the test videos", report["test"]))
    for title, rows in sections:
        table = Table(title=title)
        table.add_column("", no_wrap=True)
        for col in (*(c[:3] for c in CLASSES), "Avg."):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["name"], *(f"{100 * v:.1f}" for v in r["per_class_f1"]), f"{100 * r['macro_f1']:.1f}")
        wide.print(table)
    stdout.print(f"post-processing: {postprocess.describe(report['postprocess'])}")
    if "submission" in report:
        s = report["submission"]
        stdout.print(f"submissions: {s['abaw3_files']} ABAW3 files, {s['abaw5_rows']} ABAW5/6 rows")
