"""Per-frame predictions files: what evaluation writes and ensembles, smoothing and submissions read.

One `.npz` (read with allow_pickle=False) holding `key` (`<video>/<frame:05d>`), `label` (the
expression, -1 where none), one `logits_<head>` array per model head (its raw outputs, the columns
of each of `tracks` where `tracks.layout` puts them), `output`, the head that is the model's
prediction, `tracks`, and `truth_au` [N, 12] / `truth_va` [N, 2], the frames' labels of those
tracks when the run learns them; rows sorted by key. Files written before tracks existed hold
expressions alone. Each rank writes its own part; rank 0 merges the parts and refuses a frame seen
twice.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_dist.data.shards.format import split_key
from fer_dist.tracks import DEFAULT, TRACKS, layout


@dataclass
class Predictions:
    key: np.ndarray  # str
    label: np.ndarray  # int: the expression, -1 where none
    logits: dict[str, np.ndarray]  # head -> [N, columns] float32: raw outputs, `tracks` laid out by tracks.layout
    output: str = ""
    tracks: tuple[str, ...] = DEFAULT
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # au [N, 12] int8, va [N, 2] float32 labels

    def __len__(self) -> int:
        return len(self.key)

    def labels(self, track: str) -> np.ndarray:
        """The frames' labels of `track` ([N] int64, [N, 12] or [N, 2]; `missing` where not
        labelled, and everywhere when the file holds none of the track's)."""
        if track == "expr":
            return self.label.astype(np.int64)
        return self.truth[track] if track in self.truth else TRACKS[track].empty(len(self))

    def values(self, head: str, track: str) -> np.ndarray:
        """`head`'s values of `track` per frame (`Track.values`: probabilities, or valence-arousal)."""
        return TRACKS[track].values(self.logits[head][:, layout(self.tracks)[track]])


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The video (str) and frame number (int) of each sample key (`format.split_key`)."""
    parts = [split_key(k) for k in keys.tolist()]
    return np.array([p[0] for p in parts], str), np.array([p[1] for p in parts], np.int64)


def save(path: Path, p: Predictions) -> None:
    buf = io.BytesIO()
    logits = {f"logits_{h}": v for h, v in p.logits.items()}
    truth = {f"truth_{t}": v for t, v in p.truth.items()}
    tracks = np.array(list(p.tracks), str)
    np.savez(buf, key=p.key.astype(str), label=p.label, output=np.array(p.output), tracks=tracks, **logits, **truth)
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load(path: Path) -> Predictions:
    with np.load(path, allow_pickle=False) as z:
        logits = {name[len("logits_") :]: z[name] for name in z.files if name.startswith("logits_")}
        truth = {name[len("truth_") :]: z[name] for name in z.files if name.startswith("truth_")}
        output = str(z["output"]) if "output" in z.files else ""
        tracks = tuple(z["tracks"].tolist()) if "tracks" in z.files else DEFAULT
        return Predictions(z["key"], z["label"], logits, output, tracks, truth)


def concat(parts: list[Predictions]) -> Predictions:
    """One predictions set sorted by key; a frame in two parts is an error, never a silent overwrite."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Predictions(np.array([], str), np.array([], np.int64), {}, "")
    key = np.concatenate([p.key for p in parts])
    order = np.argsort(key, kind="stable")
    key = key[order]
    dup = key[1:][key[1:] == key[:-1]]
    if len(dup):
        raise ValueError(f"{len(dup)} frames predicted more than once, e.g. {dup[0]}")
    heads, first = parts[0].logits.keys(), parts[0]
    return Predictions(
        key,
        np.concatenate([p.label for p in parts])[order],
        {h: np.concatenate([p.logits[h] for p in parts])[order] for h in heads},
        first.output,
        first.tracks,
        {t: np.concatenate([p.truth[t] for p in parts])[order] for t in first.truth},
    )
