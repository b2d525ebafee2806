"""Paper 000's dynamic audio windows, their label-purity flags, and the geometry of the audio
members that hold them (the log-mel window's columns, the waveform window's samples).

Three windows centred on frame c: small = frames c-16..c+15, medium c-24..c+23, large c-32..c+31.
A window is usable for frame c when at least 80 % / 65 % / 50 % of its frames carry c's label.
Frames outside the video and unannotated (-1) frames count as *not* carrying it: the denominator
is always the full window width, so a window hanging over a video's edge or over an unannotated
run must be correspondingly purer inside.
"""

from __future__ import annotations

import typing

import numpy as np

from fer_dist.config import Window

NAMES: tuple[str, ...] = typing.get_args(Window)  # small, medium, large
HALF_WIDTHS = (16, 24, 32)
THRESHOLDS = (0.8, 0.65, 0.5)
WIDEST = HALF_WIDTHS[-1]  # half width, in frames, of the widest window: the one a sample stores
SILENCE = float(np.log(1e-6))  # log-mel value of digital silence and of padding
WAVE_RATE = 16000  # Hz, the waveform member's rate: the wav2vec2 family's input rate
NOMINAL_FPS = 30  # a waveform window lasts what its frame window lasts at this frame rate
PCM_SCALE = 32767  # float samples in [-1, 1] to 16-bit PCM


def wave_half(half_frames: int) -> int:
    """A window of +-`half_frames` frames as +- samples of the 16 kHz waveform (at NOMINAL_FPS:
    the durations are the same for every video, so windows stack into batches)."""
    return round(half_frames * WAVE_RATE / NOMINAL_FPS)


WAVE_WIDTH = 2 * wave_half(WIDEST)  # samples in a frame's stored waveform window


def purity_flags(labels: np.ndarray) -> np.ndarray:
    """[n, 3] bool: which of the three windows pass their threshold for each frame."""
    n = len(labels)
    onehot = np.zeros((n + 1, 8), np.int32)
    labelled = labels >= 0
    onehot[1:][labelled, labels[labelled]] = 1
    counts = np.cumsum(onehot, axis=0)  # counts[i, k]: frames before index i labelled k
    centre = np.arange(n)
    own = np.where(labelled, labels, 0)
    flags = np.zeros((n, len(NAMES)), bool)
    for k, (h, t) in enumerate(zip(HALF_WIDTHS, THRESHOLDS, strict=True)):
        lo, hi = np.maximum(centre - h, 0), np.minimum(centre + h, n)
        same = counts[hi, own] - counts[lo, own]
        flags[:, k] = labelled & (same >= t * 2 * h)
    return flags


def column_span(name: str) -> tuple[int, int]:
    """Start and width of a window inside the stored widest window (2 * WIDEST columns)."""
    h = HALF_WIDTHS[NAMES.index(name)]
    return WIDEST - h, 2 * h


def wave_span(name: str) -> tuple[int, int]:
    """Start and length of a window inside the stored waveform window (WAVE_WIDTH samples)."""
    h = wave_half(HALF_WIDTHS[NAMES.index(name)])
    return WAVE_WIDTH // 2 - h, 2 * h
