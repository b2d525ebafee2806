"""Temporal post-processing of per-frame predictions, chosen on the out-of-fold predictions of a
cross-validation and then applied, unchanged, to the test set.

Expressions seldom change from one frame to the next: a moving average of probabilities over a
window, then the filter of *Transformer-based Multimodal Information Fusion for Facial Expression
Analysis*: a run of one label shorter than its class's threshold is replaced by the most common
label of its neighbourhood, with lower thresholds and shorter neighbourhoods for minority classes.

Valence and arousal: a centred moving average whose half-window (0-50 frames) is chosen on the
out-of-fold P_VA (REFERENCE §1b, "Post-processing"). Action units: each AU's threshold chosen on the
out-of-fold probabilities (`engine.metrics.au_thresholds`), after a centred moving average of the
probabilities whose half-window is chosen the same way (REFERENCE §1b: a threshold per AU and
smoothing of a few frames each lifted a team's validation F1). Both averages run over one video's
frame numbers (`centred_mean`), never across videos.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from fer_dist.engine.metrics import au_thresholds, macro_f1, track_scores
from fer_dist.engine.predictions import split_keys
from fer_dist.labels import NUM_CLASSES
from fer_dist.tracks import ACTION_UNITS, TRACKS

WINDOWS = (1, 5, 11, 21, 41, 81)
THRESHOLDS = (0, 4, 8, 16, 32)
HALF_WINDOWS = {"au": (0, 1, 2, 3, 5, 10, 20), "va": (0, 2, 5, 10, 20, 35, 50)}  # frames each side, tried


@dataclass(frozen=True)
class PostParams:
    """What post-processing does to one track's predictions. Expressions use the first three fields
    (their `postprocess.json` holds those alone, as files of earlier versions do); action units and
    valence-arousal the last two."""

    window: int = 1  # expressions: frames in the moving average (1: none)
    thresholds: tuple[int, ...] = (0,) * NUM_CLASSES  # expressions: shortest run kept, per class (0: no filter)
    neighbourhoods: tuple[int, ...] = (0,) * NUM_CLASSES  # expressions: frames looked at on each side, per class
    track: str = "expr"
    half_window: int = 0  # au, va: frames on each side of the centred moving average (0: none)
    au_thresholds: tuple[float, ...] = (0.5,) * len(ACTION_UNITS)  # au: each AU is on from this probability

    def to_dict(self) -> dict:
        """The parameters of the track's own post-processing (`postprocess.json`)."""
        if self.track == "expr":
            return {k: v for k, v in asdict(self).items() if k in ("window", "thresholds", "neighbourhoods")}
        if self.track == "au":
            return {"track": "au", "half_window": self.half_window, "au_thresholds": list(self.au_thresholds)}
        return {"track": self.track, "half_window": self.half_window}

    @classmethod
    def from_dict(cls, d: dict) -> PostParams:
        """`to_dict`'s inverse; a dict without `track` is an expression track's."""
        track = d.get("track", "expr")
        if track == "expr":
            return cls(int(d["window"]), tuple(map(int, d["thresholds"])), tuple(map(int, d["neighbourhoods"])))
        au = tuple(float(t) for t in d.get("au_thresholds", cls.au_thresholds))
        return cls(track=track, half_window=int(d["half_window"]), au_thresholds=au)


def describe(p: dict) -> str:
    """The parameters (`PostParams.to_dict`) in words."""
    track = p.get("track", "expr")
    if track != "expr":
        h = p["half_window"]
        what = "AU probabilities" if track == "au" else "valence and arousal"
        smooth = f"{what} averaged over ±{h} frames" if h else f"{what} not smoothed"
        if track == "va":
            return smooth
        cuts = ", ".join(f"{au} {t:.2f}" for au, t in zip(ACTION_UNITS, p["au_thresholds"], strict=True))
        return f"{smooth}, then thresholds {cuts}"
    window = f"moving average over {p['window']} frames" if p["window"] > 1 else "no moving average"
    return f"{window}, run thresholds {list(p['thresholds'])} and neighbourhoods {list(p['neighbourhoods'])} per class"


def video_spans(keys: np.ndarray) -> list[slice]:
    """The slices of consecutive rows that belong to one video (rows sorted by key)."""
    return spans_of(split_keys(keys)[0])


def spans_of(videos: np.ndarray) -> list[slice]:
    """The slices of consecutive rows of one video, of each row's video name [N]."""
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


def video_frames(keys: np.ndarray) -> tuple[list[slice], np.ndarray]:
    """The rows of each video (`video_spans`) and each row's frame number, of rows sorted by key."""
    videos, frames = split_keys(keys)
    return spans_of(videos), frames


def centred_mean(values: np.ndarray, half: int, spans: list[slice], frames: np.ndarray) -> np.ndarray:
    """[N, K] float64: each row of `values` ([N, K], rows sorted by key) replaced by the mean of the
    rows of its own video (`spans`) whose frame number (`frames`, [N]) lies within ±`half` of its
    own: a frame without a prediction is left out, so the window shrinks there and at a video's ends.
    `half` 0 gives `values` unchanged."""
    values = np.asarray(values, np.float64)
    if half <= 0 or not len(values):
        return values
    out = np.empty_like(values)
    for span in spans:
        f, v = frames[span], values[span]
        sums = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(v, 0)])
        lo, hi = np.searchsorted(f, f - half, "left"), np.searchsorted(f, f + half, "right")
        out[span] = (sums[hi] - sums[lo]) / (hi - lo)[:, None]
    return out


def apply(keys: np.ndarray, values: np.ndarray, p: PostParams) -> np.ndarray:
    """Each video's rows post-processed on their own, as labels in the track's convention
    (`Track.decide`): expressions [N] after smoothing and filtering; action units [N, 12] 0/1 at
    `p.au_thresholds` after the centred mean (`centred_mean`); valence-arousal [N, 2] after it."""
    if p.track != "expr":
        smooth = centred_mean(values, p.half_window, *video_frames(keys))
        return TRACKS[p.track].decide(smooth, np.asarray(p.au_thresholds))
    labels = np.empty(len(keys), np.int64)
    for span in video_spans(keys):
        smooth = moving_average(values[span], p.window)
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


def tune_track(track: str, keys: np.ndarray, values: np.ndarray, labels: np.ndarray) -> tuple[PostParams, float, float]:
    """Post-processing of `track` chosen on out-of-fold predictions: `values` [N, outputs] (the
    track's values, `Track.values`) of the frames `keys` (sorted), `labels` in the track's convention
    (frames not annotated are not scored). Expressions: `tune`. Valence-arousal: the half-window of
    HALF_WINDOWS["va"] with the best P_VA. Action units: for each half-window of HALF_WINDOWS["au"],
    each AU's threshold (`metrics.au_thresholds`) on the smoothed probabilities; the half-window
    whose thresholds give the best mean AU F1. Ties go to the smaller half-window. Returns the
    parameters, the metric before (no smoothing; AUs at 0.5) and after them."""
    if track == "expr":
        return tune(keys, values, labels)
    t = TRACKS[track]
    scored = t.annotated(labels)
    spans, frames = video_frames(keys)

    def score(p: PostParams, smooth: np.ndarray) -> float:
        decided = t.decide(smooth, np.asarray(p.au_thresholds))
        return track_scores(t, labels[scored], decided[scored])[t.metric]

    best = PostParams(track=track)
    before = best_score = score(best, np.asarray(values, np.float64))
    for half in HALF_WINDOWS[track]:
        smooth = centred_mean(values, half, spans, frames)
        p = PostParams(track=track, half_window=half)
        if track == "au":
            cuts = au_thresholds(labels[scored], smooth[scored])
            p = PostParams(track=track, half_window=half, au_thresholds=tuple(float(c) for c in cuts))
        got = score(p, smooth)
        if got > best_score + 1e-12:
            best, best_score = p, got
    return best, before, best_score
