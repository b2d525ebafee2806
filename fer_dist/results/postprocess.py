"""Temporal post-processing of per-frame predictions: expressions seldom change from one frame to
the next. A moving average of probabilities over a window, then the filter of *Transformer-based
Multimodal Information Fusion for Facial Expression Analysis*: a run of one label shorter than its
class's threshold is replaced by the most common label of its neighbourhood, with lower thresholds
and shorter neighbourhoods for minority classes. Parameters are chosen on validation predictions
and then applied, unchanged, to the test set.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from fer_dist.engine.metrics import macro_f1
from fer_dist.engine.predictions import split_keys
from fer_dist.labels import NUM_CLASSES

WINDOWS = (1, 5, 11, 21, 41, 81)
THRESHOLDS = (0, 4, 8, 16, 32)


@dataclass(frozen=True)
class PostParams:
    window: int = 1  # frames in the moving average (1: none)
    thresholds: tuple[int, ...] = (0,) * NUM_CLASSES  # shortest run kept, per class (0: no filter)
    neighbourhoods: tuple[int, ...] = (0,) * NUM_CLASSES  # frames looked at on each side, per class

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PostParams:
        return cls(int(d["window"]), tuple(map(int, d["thresholds"])), tuple(map(int, d["neighbourhoods"])))


def describe(p: dict) -> str:
    window = f"moving average over {p['window']} frames" if p["window"] > 1 else "no moving average"
    return f"{window}, run thresholds {list(p['thresholds'])} and neighbourhoods {list(p['neighbourhoods'])} per class"


def video_spans(keys: np.ndarray) -> list[slice]:
    """The slices of consecutive rows that belong to one video (rows sorted by key)."""
    videos, _ = split_keys(keys)
    starts = np.flatnonzero(np.r_[True, videos[1:] != videos[:-1]]) if len(videos) else np.array([], int)
    ends = np.r_[starts[1:], len(videos)]
    return [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def moving_average(probs: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` rows of one video; the window shrinks at the video's ends."""
    if window <= 1 or len(probs) == 0:
        return probs
    half = window // 2
    padded = np.concatenate([np.zeros((1, probs.shape[1])), np.cumsum(probs, 0)])
    idx = np.arange(len(probs))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(probs))
    return (padded[hi] - padded[lo]) / (hi - lo)[:, None]


def filter_runs(labels: np.ndarray, thresholds, neighbourhoods) -> np.ndarray:
    """Each run of label c shorter than thresholds[c] takes the most common label among the
    neighbourhoods[c] frames on each side of it (outside the run; ties to the lower class index).
    Every run is judged on the input sequence, so the result does not depend on the order of runs."""
    out = labels.copy()
    if len(labels) == 0:
        return out
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        c = labels[a]
        n = neighbourhoods[c]
        if b - a >= thresholds[c] or n <= 0:
            continue
        around = np.concatenate([labels[max(0, a - n) : a], labels[b : b + n]])
        if len(around):
            out[a:b] = np.bincount(around, minlength=NUM_CLASSES).argmax()
    return out


def apply(keys: np.ndarray, probs: np.ndarray, p: PostParams) -> np.ndarray:
    """Labels after smoothing and filtering each video's rows on their own."""
    labels = np.empty(len(keys), np.int64)
    for span in video_spans(keys):
        smooth = moving_average(probs[span], p.window)
        labels[span] = filter_runs(smooth.argmax(1), p.thresholds, p.neighbourhoods)
    return labels


def minority(class_counts) -> np.ndarray:
    """Classes holding less than an equal share of the frames."""
    counts = np.asarray(class_counts, float)
    return counts < counts.sum() / len(counts)


def candidates(minor: np.ndarray):
    """The grid tried on validation: every window, and every threshold with a neighbourhood of
    the same length; minority classes get half of both."""
    for window, t in itertools.product(WINDOWS, THRESHOLDS):
        thresholds = tuple(int(t // 2 if m else t) for m in minor)
        yield PostParams(window, thresholds, thresholds)


def tune(keys: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> tuple[PostParams, float, float]:
    """The parameters with the best macro-F1 on these labelled predictions (the smallest on ties);
    returns them with the macro-F1 before and after."""
    scored = labels >= 0
    before = macro_f1(labels[scored], probs[scored].argmax(1))
    best, best_f1 = PostParams(), before
    for p in candidates(minority(np.bincount(labels[scored], minlength=NUM_CLASSES))):
        f1 = macro_f1(labels[scored], apply(keys, probs, p)[scored])
        if f1 > best_f1 + 1e-12:
            best, best_f1 = p, f1
    return best, before, best_f1
