"""ABAW expression submissions from per-frame labels of the test videos.

ABAW3: one `<video>.txt` per test video, the class header, then one label per frame 1..n.
ABAW5/6: one file, header `image_location,<classes>`, one row `<video>/<frame:05d>.jpg,<label>` per
frame of the organisers' template (frames without a crop included). A file that would miss a
required frame is refused, never written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_dist.data.format import atomic_write
from fer_dist.engine.predictions import split_keys
from fer_dist.labels import CLASSES


class SubmissionError(ValueError):
    """A submission would miss frames the challenge requires."""


def by_frame(keys: np.ndarray, labels: np.ndarray) -> dict[str, dict[int, int]]:
    table: dict[str, dict[int, int]] = {}
    videos, frames = split_keys(keys)
    for video, frame, label in zip(videos.tolist(), frames.tolist(), labels.tolist(), strict=True):
        table.setdefault(video, {})[frame] = label
    return table


def read_template(path: Path) -> list[tuple[str, int]]:
    """The required (video, frame) rows of an ABAW5/6 template, in its order."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    if not lines or not lines[0].startswith("image_location"):
        raise SubmissionError(f"{path}: not an ABAW expression template (first line must start with image_location)")
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        location = line.split(",", 1)[0].strip()
        if not location:
            continue
        video, _, name = location.rpartition("/")
        stem = name.rsplit(".", 1)[0]
        if not video or not stem.isdigit():
            raise SubmissionError(f"{path}:{i}: {location!r} is not <video>/<frame>.jpg")
        rows.append((video, int(stem)))
    return rows


def refuse_missing(missing: list[str], what: str) -> None:
    if missing:
        raise SubmissionError(
            f"refusing to write {what}: {len(missing)} required frame(s) have no prediction, "
            f"e.g. {', '.join(missing[:3])}"
        )


def write_abaw3(out: Path, keys: np.ndarray, labels: np.ndarray, frames: dict[str, int]) -> list[Path]:
    """One file per video in `frames` (video -> its number of frames); every frame must be predicted."""
    table = by_frame(keys, labels)
    required = [(video, f) for video, n in sorted(frames.items()) for f in range(1, n + 1)]
    missing = [f"{video}/{f:05d}" for video, f in required if f not in table.get(video, {})]
    refuse_missing(missing, f"the ABAW3 files in {out}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for video, n in sorted(frames.items()):
        body = ",".join(CLASSES) + "\n" + "".join(f"{table[video][f]}\n" for f in range(1, n + 1))
        atomic_write(out / f"{video}.txt", body.encode())
        written.append(out / f"{video}.txt")
    return written


def write_abaw5(path: Path, keys: np.ndarray, labels: np.ndarray, required: list[tuple[str, int]]) -> int:
    """The single file with one row per required frame, in the template's order; returns its rows."""
    table = by_frame(keys, labels)
    missing = [f"{v}/{f:05d}" for v, f in required if f not in table.get(v, {})]
    refuse_missing(missing, str(path))
    body = "image_location," + ",".join(CLASSES) + "\n"
    body += "".join(f"{v}/{f:05d}.jpg,{table[v][f]}\n" for v, f in required)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, body.encode())
    return len(required)
