"""ABAW submissions from per-frame labels of the test videos, for any track (REFERENCE §1b).

ABAW3: one `<video>.txt` per test video, the track's header (the classes, the 12 AUs or
`valence,arousal`), then one row per frame 1..n (a class index, twelve 0/1, or two values).
ABAW5/6: one file, header `image_location,<header>`, one row `<video>/<frame:05d>.jpg,<values>` per
frame of the organisers' template (frames without a crop included: packing gives them the nearest
crop). Rows are written by `Track.format`. Both formats are made and checked before either is
written: a submission that would miss a required frame is refused, and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fer_dist.data.packing.layout import read_text
from fer_dist.data.shards.format import sample_key
from fer_dist.engine.predictions import split_keys
from fer_dist.errors import InputError
from fer_dist.tracks import TRACKS


class SubmissionError(InputError):
    """A submission would miss frames the challenge requires."""


def by_frame(keys: np.ndarray, labels: np.ndarray) -> dict[str, dict[int, object]]:
    """{video: {frame: label}} of [N] keys and [N] or [N, width] labels (a row's values a list)."""
    table: dict[str, dict[int, object]] = {}
    videos, frames = split_keys(keys)
    for video, frame, label in zip(videos.tolist(), frames.tolist(), labels.tolist(), strict=True):
        table.setdefault(video, {})[frame] = label
    return table


def read_template(path: Path, track: str = "expr") -> list[tuple[str, int]]:
    """The required (video, frame) rows of an ABAW5/6 template of `track`, in its order. Raises
    SubmissionError for a first line that is not `image_location,...`, one that names another
    track's columns (another track's template), or a row that names no `<video>/<frame>.jpg`."""
    lines = read_text(path).splitlines()
    if not lines or not lines[0].startswith("image_location"):
        raise SubmissionError(f"{path}: not an ABAW template (first line must start with image_location)")
    names = {n.strip() for n in lines[0].split(",")[1:] if n.strip()}
    other = [t for name, t in TRACKS.items() if name != track and names and names == set(t.columns)]
    if other:
        raise SubmissionError(
            f"{path}: a template of {other[0].title} (its header names {', '.join(other[0].columns[:3])}, ...), "
            f"not of {TRACKS[track].title}"
        )
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


def abaw3(keys: np.ndarray, labels: np.ndarray, frames: dict[str, int], track: str = "expr") -> dict[str, bytes]:
    """`<video>.txt` of each video in `frames` (video -> its number of frames): `track`'s header,
    then the row of frames 1..n (`labels` [N] or [N, width] in the track's convention, `keys` [N]).
    Raises `SubmissionError` when a frame has no prediction."""
    table = by_frame(keys, labels)
    required = [(video, f) for video, n in sorted(frames.items()) for f in range(1, n + 1)]
    refuse_missing([sample_key(v, f) for v, f in required if f not in table.get(v, {})], "the ABAW3 files")
    t = TRACKS[track]
    header = ",".join(t.columns) + "\n"
    return {
        f"{video}.txt": (header + "".join(f"{t.format(table[video][f])}\n" for f in range(1, n + 1))).encode()
        for video, n in sorted(frames.items())
    }


def abaw5(
    keys: np.ndarray,
    labels: np.ndarray,
    required: list[tuple[str, int]],
    named: list[tuple[str, int]] | None = None,
    track: str = "expr",
) -> bytes:
    """The single ABAW5/6 file of `track`: one row per required (video, frame), in the template's
    order, each named as in `named` when given (a template row past its video's end names its own
    frame and takes the label of the last). Raises `SubmissionError` when a required frame has no
    prediction."""
    table = by_frame(keys, labels)
    refuse_missing([sample_key(v, f) for v, f in required if f not in table.get(v, {})], "the ABAW5/6 file")
    rows = zip(named or required, required, strict=True)
    t = TRACKS[track]
    body = "image_location," + ",".join(t.columns) + "\n"
    return (body + "".join(f"{v}/{f:05d}.jpg,{t.format(table[v][g])}\n" for (v, f), (_, g) in rows)).encode()


def write(folder: Path, files: dict[str, bytes]) -> None:
    """All the files at once: written into a fresh folder beside `folder`, which then takes its
    place, so that `folder` holds either the previous complete submission or this one, never a mix
    or a part."""
    folder = Path(folder)
    fresh, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    for name, data in files.items():
        (fresh / name).parent.mkdir(parents=True, exist_ok=True)
        (fresh / name).write_bytes(data)
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
