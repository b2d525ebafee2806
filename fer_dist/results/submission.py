"""ABAW expression submissions from per-frame labels of the test videos.

ABAW3: one `<video>.txt` per test video, the class header, then one label per frame 1..n.
ABAW5/6: one file, header `image_location,<classes>`, one row `<video>/<frame:05d>.jpg,<label>` per
frame of the organisers' template (frames without a crop included). Both formats are made and
checked before either is written: a submission that would miss a required frame is refused, and
nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fer_dist.data.packing.layout import read_text
from fer_dist.data.shards.format import sample_key
from fer_dist.engine.predictions import split_keys
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES


class SubmissionError(InputError):
    """A submission would miss frames the challenge requires."""


def by_frame(keys: np.ndarray, labels: np.ndarray) -> dict[str, dict[int, int]]:
    table: dict[str, dict[int, int]] = {}
    videos, frames = split_keys(keys)
    for video, frame, label in zip(videos.tolist(), frames.tolist(), labels.tolist(), strict=True):
        table.setdefault(video, {})[frame] = label
    return table


def read_template(path: Path) -> list[tuple[str, int]]:
    """The required (video, frame) rows of an ABAW5/6 template, in its order."""
    lines = read_text(path).splitlines()
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


def abaw3(keys: np.ndarray, labels: np.ndarray, frames: dict[str, int]) -> dict[str, bytes]:
    """`<video>.txt` of each video in `frames` (video -> its number of frames): the class header,
    then the label of frames 1..n. Raises `SubmissionError` when a frame has no prediction."""
    table = by_frame(keys, labels)
    required = [(video, f) for video, n in sorted(frames.items()) for f in range(1, n + 1)]
    refuse_missing([sample_key(v, f) for v, f in required if f not in table.get(v, {})], "the ABAW3 files")
    header = ",".join(CLASSES) + "\n"
    return {
        f"{video}.txt": (header + "".join(f"{table[video][f]}\n" for f in range(1, n + 1))).encode()
        for video, n in sorted(frames.items())
    }


def abaw5(
    keys: np.ndarray, labels: np.ndarray, required: list[tuple[str, int]], named: list[tuple[str, int]] | None = None
) -> bytes:
    """The single ABAW5/6 file: one row per required (video, frame), in the template's order, each
    named as in `named` when given (a template row past its video's end names its own frame and
    takes the label of the last). Raises `SubmissionError` when a required frame has no prediction."""
    table = by_frame(keys, labels)
    refuse_missing([sample_key(v, f) for v, f in required if f not in table.get(v, {})], "the ABAW5/6 file")
    rows = zip(named or required, required, strict=True)
    body = "image_location," + ",".join(CLASSES) + "\n"
    return (body + "".join(f"{v}/{f:05d}.jpg,{table[v][g]}\n" for (v, f), (_, g) in rows)).encode()


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
