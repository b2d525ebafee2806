"""Per-frame predictions files: what evaluation writes and ensembles, smoothing and submissions read.

One `.npz` (read with allow_pickle=False) holding `key` (`<video>/<frame:05d>`), `label`, one
`logits_<head>` array per model head and `output`, the head that is the model's prediction; rows
sorted by key. Each rank writes its own part; rank 0
merges the parts and refuses a frame seen twice.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_dist.data.shards.format import split_key


@dataclass
class Predictions:
    key: np.ndarray  # str
    label: np.ndarray  # int
    logits: dict[str, np.ndarray]  # head -> [N, classes] float32
    output: str = ""

    def __len__(self) -> int:
        return len(self.key)


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The video (str) and frame number (int) of each sample key (`format.split_key`)."""
    parts = [split_key(k) for k in keys.tolist()]
    return np.array([p[0] for p in parts], str), np.array([p[1] for p in parts], np.int64)


def save(path: Path, p: Predictions) -> None:
    buf = io.BytesIO()
    logits = {f"logits_{h}": v for h, v in p.logits.items()}
    np.savez(buf, key=p.key.astype(str), label=p.label, output=np.array(p.output), **logits)
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load(path: Path) -> Predictions:
    with np.load(path, allow_pickle=False) as z:
        logits = {name[len("logits_") :]: z[name] for name in z.files if name.startswith("logits_")}
        output = str(z["output"]) if "output" in z.files else ""
        return Predictions(z["key"], z["label"], logits, output)


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
    heads = parts[0].logits.keys()
    return Predictions(
        key,
        np.concatenate([p.label for p in parts])[order],
        {h: np.concatenate([p.logits[h] for p in parts])[order] for h in heads},
        parts[0].output,
    )
