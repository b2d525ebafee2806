"""Labels of users' own corpora as the challenge's annotation files: `fer-dist crop --labels CSV`.

The CSV has a header and one row per video or per range of frames:

    video,label[,split]                          a clip-level label for every frame of the video
    video,start_frame,end_frame,label[,split]    frames start..end (1-based, both included)

`label` is a class name (Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise, Other; any
case) or its index 0-7; `split` is train (the default) or val. `video` names a cropped video (its
every face) or one face of a two-person video (`<video>_left`). Each face gets
`ROOT/annotations/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<face>.txt`: the class
header, then one line per frame of the video, -1 where no row covers it, so `fer-dist shard
--root ROOT` packs exactly the labelled frames. Unknown classes or videos, ranges past the video's
end and overlapping ranges are refused, naming the row, and then no annotation file is written.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_dist.data.packing.layout import read_text
from fer_dist.data.shards.format import atomic_write
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, UNLABELLED

CHALLENGE = Path("annotations") / "EXPR_Recognition_Challenge"
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}
SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
CLIP_COLUMNS = ("video", "label")
RANGE_COLUMNS = ("video", "start_frame", "end_frame", "label")


class LabelsError(InputError):
    """A labels CSV that cannot be turned into annotation files; the message names the row."""


@dataclass(frozen=True)
class LabelRow:
    where: str  # "<csv>:<line>", for messages
    video: str  # a video's or a face's name
    start: int | None  # first frame (1-based); None: the whole video
    end: int | None  # last frame, included
    label: int  # 0..7
    split: str  # "train" or "val"


def class_index(text: str) -> int:
    """0..7 from a class name (any case) or an index; ValueError otherwise."""
    names = {c.lower(): i for i, c in enumerate(CLASSES)}
    if text.strip().lower() in names:
        return names[text.strip().lower()]
    if text.strip().isdigit() and int(text) < len(CLASSES):
        return int(text)
    raise ValueError(f"unknown class {text!r}; expected one of {', '.join(CLASSES)} or an index 0-{len(CLASSES) - 1}")


def read_labels(path: Path) -> list[LabelRow]:
    """The rows of a labels CSV (the module's docstring gives its columns). Raises LabelsError,
    naming the line, for a missing header, an unknown class or split, a frame number that is not
    a positive integer, and start_frame after end_frame."""
    path = Path(path)
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)
        header = tuple(c.strip() for c in reader.fieldnames or ())
        columns = [c for c in header if c != "split"]
        if tuple(columns) not in (CLIP_COLUMNS, RANGE_COLUMNS):
            raise LabelsError(
                f"{path}:1: header {','.join(header) or '(empty)'!r}; expected {','.join(CLIP_COLUMNS)} or "
                f"{','.join(RANGE_COLUMNS)}, each with an optional split column"
            )
        ranged = tuple(columns) == RANGE_COLUMNS
        rows = []
        for raw in reader:
            where = f"{path}:{reader.line_num}"
            values = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(values.values()):
                continue
            if None in raw or any(raw.get(k) is None for k in reader.fieldnames if k.strip() != "split"):
                raise LabelsError(f"{where}: {len(header)} columns expected ({','.join(header)})")
            try:
                label = class_index(values["label"])
                split = SPLITS.get(values.get("split", "train").lower() or "train")
                if split is None:
                    raise ValueError(f"unknown split {values['split']!r}; expected train or val")
                start = end = None
                if ranged:
                    start, end = (int(values[k]) for k in ("start_frame", "end_frame"))
                    if start < 1 or end < start:
                        raise ValueError(f"frames {start}-{end}: start_frame must be >= 1 and <= end_frame")
            except ValueError as exc:
                raise LabelsError(f"{where}: {exc}") from None
            if not values["video"]:
                raise LabelsError(f"{where}: no video named")
            rows.append(LabelRow(where, values["video"], start, end, label, split))
    if not rows:
        raise LabelsError(f"{path}: no rows")
    return rows


def plan(rows: list[LabelRow], reports: list[dict]) -> tuple[dict[str, tuple[np.ndarray, str]], list[str]]:
    """Each face's labels (int8, one per frame, -1 where no row covers it) and split, from the
    rows and the crop reports; and the rows skipped because their video could not be read.
    Raises LabelsError naming the row for an unknown video or face, a range past the video's
    last frame, a range overlapping another row's, and two splits for one video."""
    by_name = {r["video"]: r for r in reports}
    faces_of = {r["video"]: r["names"] or [r["video"]] for r in reports}
    parent_of = {face: r["video"] for r in reports for face in faces_of[r["video"]]}
    out: dict[str, tuple[np.ndarray, str]] = {}
    owner: dict[str, list[LabelRow | None]] = {}
    split_of: dict[str, LabelRow] = {}
    skipped = []
    for row in rows:
        parent = row.video if row.video in by_name else parent_of.get(row.video)
        if parent is None:
            known = sorted(set(faces_of) | set(parent_of))
            raise LabelsError(
                f"{row.where}: no cropped video or face named {row.video!r} (known: {', '.join(known[:8])}"
                f"{', ...' if len(known) > 8 else ''})"
            )
        report = by_name[parent]
        if report["error"]:
            skipped.append(f"{row.where}: skipped, {report['source']} could not be read")
            continue
        if parent in split_of and split_of[parent].split != row.split:
            raise LabelsError(
                f"{row.where}: {parent} is in split {row.split} here and {split_of[parent].split} at "
                f"{split_of[parent].where}; the faces of one video share a split"
            )
        split_of[parent] = row
        n = report["frames"]
        start, end = (1, n) if row.start is None else (row.start, row.end)
        if end > n:
            raise LabelsError(f"{row.where}: frames {start}-{end} run past the end of {parent} ({n} frames)")
        for face in faces_of[parent] if row.video == parent else [row.video]:
            labels, _ = out.setdefault(face, (np.full(n, UNLABELLED, np.int8), row.split))
            rows_of = owner.setdefault(face, [None] * n)
            clash = next((r for r in rows_of[start - 1 : end] if r is not None), None)
            if clash is not None:
                raise LabelsError(f"{row.where}: frames {start}-{end} of {face} overlap the row at {clash.where}")
            labels[start - 1 : end] = row.label
            rows_of[start - 1 : end] = [row] * (end - start + 1)
    return {face: (labels, split_of[parent_of.get(face, face)].split) for face, (labels, _) in out.items()}, skipped


def write(root: Path, rows: list[LabelRow], reports: list[dict]) -> tuple[list[Path], list[str]]:
    """The annotation files of every labelled face under `root` (all checked before any is
    written); returns them, and what a user must hear: rows skipped, videos left unlabelled."""
    labels, skipped = plan(rows, reports)
    named = {row.video for row in rows}
    skipped += [
        f"{r['video']}: no row in the labels; not annotated, so shard will not pack it"
        for r in reports
        if r["video"] not in named and not set(r["names"]) & named
    ]
    written = []
    for face, (values, split) in sorted(labels.items()):
        folder = Path(root) / CHALLENGE / SPLIT_FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        for other in SPLIT_FOLDERS.values():  # a face moved to the other split leaves no stale file
            if other != SPLIT_FOLDERS[split]:
                (Path(root) / CHALLENGE / other / f"{face}.txt").unlink(missing_ok=True)
        body = ",".join(CLASSES) + "\n" + "".join(f"{v}\n" for v in values.tolist())
        atomic_write(folder / f"{face}.txt", body.encode())
        written.append(folder / f"{face}.txt")
    return written, skipped
