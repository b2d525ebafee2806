"""Aff-Wild2's per-frame tracks: expressions, action units and valence-arousal, in one registry.

What a track is on disk and in a submission lives here, once; every stage asks `TRACKS[name]`:

    name      the config's `tracks`, `--tracks expr,au,va`, `fer-dist score --track`
    folders   the annotation folder of each edition (ABAW6+, ABAW3/5, ABAW1/2), newest first
    columns   the annotation header's names, in the order a label's values follow
    missing   the "not annotated" marker (-1, or -5 for valence-arousal), never trained or scored
    outputs   the width of a model's head for it (8 logits, 12 AU logits, 2 values)
    metric    the key of its challenge metric (expression macro-F1, mean AU F1, P_VA)

A label is an array in the annotation's own convention: expressions [n] int8 class indices (0-7),
action units [n, 12] int8 of 0/1, valence-arousal [n, 2] float64 in [-1, 1]; a frame not annotated
holds `missing` (anywhere in its row). Formats and metrics: ABAW3-6 (REFERENCE §1b); the twelve AUs
and their order are ABAW3's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fer_dist.errors import InputError
from fer_dist.labels import CLASSES

ACTION_UNITS = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26")
DIMENSIONS = ("valence", "arousal")


class TrackError(InputError):
    """A track name fer-dist does not know, or a row that is not one of a track's labels."""


@dataclass(frozen=True)
class Track:
    """One per-frame track (the module's docstring gives each field)."""

    name: str
    title: str
    folders: tuple[str, ...]
    columns: tuple[str, ...]
    missing: int
    outputs: int
    metric: str
    metric_title: str

    @property
    def width(self) -> int:
        """Values per frame in a label: 1 class index, 12 AU flags, 2 dimensions."""
        return 1 if self.name == "expr" else len(self.columns)

    def empty(self, n: int) -> np.ndarray:
        """Labels of `n` frames, none annotated: [n] or [n, width], filled with `missing`."""
        shape = (n,) if self.width == 1 else (n, self.width)
        return np.full(shape, self.missing, np.int8 if self.name != "va" else np.float64)

    def annotated(self, labels: np.ndarray) -> np.ndarray:
        """[n] bool: the frames of [n] or [n, width] `labels` that carry this track's label."""
        hit = labels != self.missing
        return hit if hit.ndim == 1 else hit.all(1)

    def header_order(self, names: list[str]) -> np.ndarray:
        """Where each of a header's `names` goes among `columns`. Expressions take ABAW1/2's 7-class
        header (no Other) by name; the others need every column, in any order. Raises TrackError."""
        unknown = [n for n in names if n not in self.columns]
        complete = self.name == "expr" or set(names) == set(self.columns)
        if unknown or len(set(names)) != len(names) or not complete:
            other = [t.title for t in TRACKS.values() if t is not self and set(names) == set(t.columns)]
            raise TrackError(
                f"header {','.join(names)!r} is not a header of {self.title}"
                + (f" but of {other[0]} (a file in another track's folder?)" if other else "")
                + f"; expected {','.join(self.columns)}"
                + (" (or the 7-class subset without Other)" if self.name == "expr" else " (in any order)")
            )
        return np.array([self.columns.index(n) for n in names])

    def parse(self, fields: list[str], order: np.ndarray) -> np.ndarray | int | None:
        """One annotation row's label (`fields`: its comma-separated values, in the header's order,
        placed by `order`); None when the row says "not annotated". Raises TrackError naming what
        is wrong (the caller adds the file and line)."""
        want = 1 if self.name == "expr" else len(order)
        text = ",".join(fields)
        if len(fields) != want:
            raise TrackError(f"{len(fields)} value(s) in {text!r}; {self.title} rows hold {want}")
        if self.name == "expr":
            try:
                value = int(fields[0])
            except ValueError:
                value = None
            if value is None or not self.missing <= value < len(order):
                raise TrackError(f"malformed label {text!r}; expected -1 or an integer 0..{len(order) - 1}")
            return None if value == self.missing else int(order[value])
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise TrackError(f"malformed row {text!r}; expected {want} numbers") from None
        if self.missing in values:
            return None
        if self.name == "au" and any(v not in (0, 1) for v in values):
            raise TrackError(f"malformed row {text!r}; each AU is 0 or 1 (-1 where not annotated)")
        if self.name == "va" and not all(math.isfinite(v) and -1 <= v <= 1 for v in values):
            raise TrackError(f"malformed row {text!r}; valence and arousal lie in [-1, 1] (-5 where not annotated)")
        label = np.empty(want, np.int8 if self.name == "au" else np.float64)
        label[order] = values
        return label

    def values(self, outputs: np.ndarray) -> np.ndarray:
        """A head's raw [N, outputs] columns for this track as the track's values: expression class
        probabilities (softmax), AU probabilities (sigmoid), valence and arousal in (-1, 1) (tanh)."""
        outputs = np.asarray(outputs, np.float64)
        if self.name == "expr":
            e = np.exp(outputs - outputs.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        return 1 / (1 + np.exp(-outputs)) if self.name == "au" else np.tanh(outputs)

    def raw(self, values: np.ndarray) -> np.ndarray:
        """`values`' raw outputs again, as a head gives them (the inverse of `values`): AU
        probabilities as logits, valence-arousal as atanh (clipped off 0, 1 and +-1); expression
        probabilities as they are (their argmax is the label, as files of earlier versions hold)."""
        if self.name == "expr":
            return np.asarray(values)
        if self.name == "au":
            p = np.clip(values, 1e-9, 1 - 1e-9)
            return np.log(p) - np.log1p(-p)
        return np.arctanh(np.clip(values, -1 + 1e-12, 1 - 1e-12))

    def decide(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5) -> np.ndarray:
        """[N, outputs] `values` as labels in the annotation's convention: the most probable class
        [N]; each AU on where its probability reaches its threshold ([12] or one for all) [N, 12];
        valence and arousal as they are [N, 2]."""
        if self.name == "expr":
            return np.asarray(values).argmax(1)
        return (np.asarray(values) >= thresholds).astype(np.int8) if self.name == "au" else np.asarray(values)

    def format(self, value) -> str:
        """One submission row's values: a class index, twelve 0/1, or `valence,arousal`."""
        if self.name == "expr":
            return str(int(value))
        if self.name == "au":
            return ",".join(str(int(v)) for v in value)
        return ",".join(f"{float(v):.6g}" for v in value)


TRACKS = {
    "expr": Track(
        "expr",
        "expressions",
        ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge", "EXPR_Set"),
        CLASSES,
        -1,
        len(CLASSES),
        "macro_f1",
        "macro-F1",
    ),
    "au": Track(
        "au",
        "action units",
        ("AU_Detection_Challenge", "AU_Set"),
        ACTION_UNITS,
        -1,
        len(ACTION_UNITS),
        "au_f1",
        "mean AU F1",
    ),
    "va": Track(
        "va",
        "valence-arousal",
        ("VA_Estimation_Challenge", "VA_Set"),
        DIMENSIONS,
        -5,
        len(DIMENSIONS),
        "p_va",
        "P_VA (mean CCC)",
    ),
}


DEFAULT = ("expr",)  # the tracks a run learns when its config names none


def track(name: str) -> Track:
    """The track called `name` (expr, au, va). Raises TrackError naming the known ones."""
    if name not in TRACKS:
        raise TrackError(f"unknown track {name!r}; fer-dist knows {', '.join(TRACKS)}")
    return TRACKS[name]


def layout(names: list[str] | tuple[str, ...]) -> dict[str, slice]:
    """Where each of the tracks `names` lies among a head's output columns: the tracks in registry
    order, each `outputs` wide (expressions 0:8, then action units, then valence-arousal)."""
    spans, start = {}, 0
    for name, t in TRACKS.items():
        if name in names:
            spans[name], start = slice(start, start + t.outputs), start + t.outputs
    return spans


def parse_tracks(text: str) -> list[Track]:
    """The tracks of a comma-separated list (`--tracks expr,au`), in registry order, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise TrackError("--tracks names no track; give some of " + ", ".join(TRACKS))
    chosen = {track(n).name for n in names}
    return [t for name, t in TRACKS.items() if name in chosen]
