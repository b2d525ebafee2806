"""Scoring a submission against annotation files, for any track: `fer-dist score`.

The organisers' scoring scripts are not public; this reads both submission formats (REFERENCE §1b):

    ABAW3    a folder of `<video>.txt`: the track's header, then the row of frame 1, 2, ... N
    ABAW5/6  one file: `image_location,<header>`, then `<video>/<frame:05d>.jpg,<values>` rows

and scores every annotated frame of every annotation file (`<video>.txt` in the annotations folder,
e.g. `AU_Detection_Challenge/Validation_Set`) at once, with the track's metric
(`engine/metrics.track_scores`). A submission must give every annotated frame; one that lacks some,
holds a malformed row or gives one frame twice is refused, naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_dist.data.packing.layout import LayoutError, read_annotation, read_text
from fer_dist.engine.metrics import track_scores
from fer_dist.errors import InputError
from fer_dist.tracks import Track, TrackError

LOCATION = "image_location"


class ScoreError(InputError):
    """A submission or annotation folder that cannot be scored; the message names the file and line."""


def read_rows(path: Path, track: Track, located: bool) -> dict[str, dict[int, object]]:
    """The predictions in one submission file, {video: {frame: label}}: an ABAW3 file (`located`
    False: row k is frame k of the video the file is named after) or the ABAW5/6 file (True).
    Raises ScoreError naming the line of a wrong header, a malformed row or a frame given twice."""
    lines = read_text(path).splitlines()
    names = [n.strip() for n in lines[0].split(",")] if lines else []
    if located and names[:1] != [LOCATION]:
        raise ScoreError(f"{path}:1: an ABAW5/6 submission's header starts with {LOCATION}")
    try:  # ABAW5/6 expression files name the classes in the header and give one index a row
        order = track.header_order(names[1:] if located else names)
    except TrackError as exc:
        raise ScoreError(f"{path}:1: {exc}") from None
    width = 1 if track.width == 1 else len(order)
    table: dict[str, dict[int, object]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        video, frame = path.stem, number - 1
        if located:
            location = fields.pop(0)
            video, _, name = location.rpartition("/")
            stem = name.split(".")[0]
            if not video or not stem.isdigit() or int(stem) < 1:
                raise ScoreError(f"{path}:{number}: {location!r} is not <video>/<frame>.jpg")
            frame = int(stem)
        try:
            if len(fields) != width:
                raise TrackError(f"{len(fields)} value(s); {track.title} rows hold {width}")
            label = track.parse(fields, order)
            if label is None:
                raise TrackError(f"{','.join(fields)!r} is the 'not annotated' marker, not a prediction")
        except TrackError as exc:
            raise ScoreError(f"{path}:{number}: {exc}") from None
        if frame in table.setdefault(video, {}):
            raise ScoreError(f"{path}:{number}: {video}/{frame:05d} is given twice")
        table[video][frame] = label
    return table


def read_submission(path: Path, track: Track) -> dict[str, dict[int, object]]:
    """Every prediction of a submission in either format, {video: {frame: label}}."""
    path = Path(path)
    if path.is_file():
        return read_rows(path, track, located=True)
    if not path.is_dir():
        raise ScoreError(f"{path}: no such file or folder")
    files = sorted(path.glob("*.txt"))
    if not files:
        raise ScoreError(f"{path}: no <video>.txt files (an ABAW3 submission) in this folder")
    return {f.stem: read_rows(f, track, located=False).get(f.stem, {}) for f in files}


def read_truth(folder: Path, track: Track) -> dict[str, np.ndarray]:
    """Every annotation file's labels in `folder`, {video: labels} (`layout.read_annotation`)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        inside = [d.name for d in sorted(folder.iterdir()) if d.is_dir()] if folder.is_dir() else []
        hint = f" (it holds {', '.join(inside)}: name one)" if inside else ""
        raise ScoreError(f"{folder}: no annotation files (<video>.txt){hint}")
    try:
        return {f.stem: read_annotation(f, track) for f in files}
    except LayoutError as exc:
        raise ScoreError(str(exc)) from None


def score(track: Track, annotations: Path, submission: Path) -> dict:
    """The track's metric of `submission` over every annotated frame in `annotations`, with its
    parts (per class, per AU, per dimension) and counts: the submitted videos without an annotation
    file (`unscored_videos`) and the rows past the end of a video's annotation file (`past_end`),
    neither scored. Raises ScoreError when a frame is missing."""
    truth = read_truth(annotations, track)
    given = read_submission(submission, track)
    labels, preds, missing, past_end = [], [], [], 0
    for video, values in sorted(truth.items()):
        frames = np.flatnonzero(track.annotated(values)) + 1
        rows = given.get(video, {})
        missing += [f"{video}/{f:05d}" for f in frames.tolist() if f not in rows]
        past_end += sum(f > len(values) for f in rows)
        labels.append(values[frames - 1])
        preds += [rows.get(f, values[f - 1]) for f in frames.tolist()]
    if missing:
        raise ScoreError(
            f"{submission}: {len(missing)} annotated frame(s) have no prediction, e.g. {', '.join(missing[:3])}"
        )
    stacked = np.concatenate(labels)
    result = track_scores(track, stacked, np.asarray(preds, stacked.dtype).reshape(stacked.shape))
    result.update(
        track=track.name,
        videos=len(truth),
        unscored_videos=sorted(set(given) - set(truth)),
        past_end=int(past_end),
    )
    return result
