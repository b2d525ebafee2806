"""Class-balanced resampling as expected copies per read sample.

A read training sample of video v and class c is emitted e_vc times in expectation, by stochastic
rounding (floor(e) copies plus one more with probability e - floor(e)), so a frame given no copy
is never decoded. The expectation is the product of three factors:

    e_vc = keep_c * cap_vc * m_c

- cap_vc = min(1, N_c / n_vc): the per-(video, class) cap of paper 001 (Transformer-based
  Multimodal Information Fusion for Facial Expression Analysis), at most N_c frames of class c
  from one video per pass, against identity as well as class imbalance;
- keep_c: the majority-class subsampling of paper 000, a kept fraction per class;
- m_c = t_c / p_c: reshapes the capped, subsampled source distribution p to the target t, at
  most `max_repeat`. Targets follow t_c ~ n_c^q (Kang et al. 2020): q = 1 natural, 1/2 sqrt,
  0 uniform; or explicit per-class weights.

Without caps and subsampling the mean of e over the source is 1: an epoch reads as many samples
as it emits. `resampling_plan` makes the plan of a run (its training groups, the frames its model's
stream keeps) and `batches_per_epoch` the epoch it sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from fer_dist.config import DataConfig
from fer_dist.data.shards.format import PACKED, Manifest
from fer_dist.data.shards.windows import NAMES

EXPONENT = {"natural": 1.0, "sqrt": 0.5, "uniform": 0.0}
FAMILIES = (*EXPONENT, "weights")


@dataclass(frozen=True)
class Plan:
    copies: dict[str, np.ndarray]  # video -> expected copies of a read sample, per class ({}: one each)
    read: np.ndarray  # usable frames per class, one pass over the source
    emitted: np.ndarray  # expected copies emitted per class for one pass
    target: np.ndarray  # the configured target class distribution
    discarded_fraction: float  # expected share of read samples given no copy
    au_copies: np.ndarray | None = None  # [12] expected copies of a frame with that AU on (`rare_au_copies`)


def target_distribution(counts: np.ndarray, family: str, weights: list[float] | None = None) -> np.ndarray:
    counts = np.asarray(counts, float)
    present = counts > 0
    if family == "weights":
        target = np.where(present, np.asarray(weights, float), 0.0)
    else:
        target = np.where(present, np.power(np.maximum(counts, 1), EXPONENT[family]), 0.0)
    return target / target.sum()


def expected_copies(counts: np.ndarray, target: np.ndarray, max_repeat: float) -> np.ndarray:
    """m_c per class (0 for classes absent from the source), capped at max_repeat."""
    counts = np.asarray(counts, float)
    source = counts / counts.sum()
    copies = np.divide(target, source, out=np.zeros_like(source), where=source > 0)
    return np.minimum(copies, max_repeat)


def plan(
    counts_by_video: dict[str, np.ndarray],
    family: str,
    *,
    weights: list[float] | None = None,
    keep: list[float] | None = None,
    caps: list[int] | None = None,
    max_repeat: float = 8.0,
) -> Plan:
    """Expected copies per (video, class) from the usable frame counts n_vc of the source.

    `caps[c]` = 0 and `keep[c]` = 1 leave class c uncapped and unthinned."""
    videos = sorted(counts_by_video)
    n = np.array([counts_by_video[v] for v in videos], float).reshape(len(videos), -1)
    keep_c = np.ones(n.shape[1]) if keep is None else np.asarray(keep, float)
    cap_c = np.zeros(n.shape[1]) if caps is None else np.asarray(caps, float)
    capped = np.where((cap_c > 0) & (n > cap_c), np.divide(cap_c, n, out=np.ones_like(n), where=n > 0), 1.0)
    kept = keep_c * capped
    source = (n * kept).sum(0)
    target = target_distribution(source, family, weights)
    factor = expected_copies(source, target, max_repeat) if source.sum() else np.zeros_like(source)
    copies = kept * factor
    discarded = float((n * np.maximum(0.0, 1.0 - copies)).sum() / max(1.0, n.sum()))
    return Plan(dict(zip(videos, copies, strict=True)), n.sum(0), (n * copies).sum(0), target, discarded)


def draw_copies(mean: float, rng: random.Random) -> int:
    whole = int(mean)
    return whole + (rng.random() < mean - whole)


def no_window_policy(cfg: DataConfig, inputs: tuple[str, ...] = PACKED) -> str:
    """What a training frame without a pure audio window gets: clip mode needs every frame's audio
    (the widest window), and a model that hears nothing needs no window at all (the frame is kept:
    dropping it would throw away the frames around every change of expression for nothing)."""
    hears = "audio" in inputs or "wave" in inputs
    return "widest" if cfg.sequence_length or not hears else cfg.no_window


def usable_patterns(cfg: DataConfig, inputs: tuple[str, ...] = PACKED) -> list[int]:
    """Window-flag patterns (s + 2m + 4l) of frames the training stream keeps."""
    if no_window_policy(cfg, inputs) == "widest":
        return list(range(8))
    bits = [1 << NAMES.index(w) for w in cfg.train_windows]
    return [p for p in range(8) if any(p & b for b in bits)]


def rare_au_copies(positives: np.ndarray, max_repeat: float) -> np.ndarray:
    """[12] expected copies of a read frame for each AU it has on: sqrt(n_max / n_j), n_j the
    training frames with AU j on and n_max the commonest AU's (the square-root rule of class-balanced
    sampling, Kang et al. 2020, per AU), at most `max_repeat`; 1 for an AU never on. A frame takes
    the copies of its rarest AU that is on, and 1 when none is (`frame_copies`)."""
    n = np.asarray(positives, float)
    ratio = np.sqrt(np.divide(n.max(initial=0.0), n, out=np.ones_like(n), where=n > 0))
    return np.minimum(np.maximum(ratio, 1.0), max_repeat)


def frame_copies(au: list[int] | None, au_copies) -> float:
    """The expected copies of a frame whose AUs are `au` (12 of 0/1): the largest of `au_copies`
    ([12], a list on the stream's path) over the AUs it has on, 1 with none on."""
    on = [c for c, v in zip(au_copies, au or (), strict=False) if v == 1]
    return max(on, default=1.0)


def natural_plan(manifest: Manifest, groups: list[str], track: str, cfg: DataConfig) -> Plan:
    """Every read frame labelled for `track` (action units, valence-arousal: the classes and their
    audio windows' purity are an expression run's) once; `read` is their count. For action units
    with `data.au_balance: rare`, frames with rare AUs on more often (`rare_au_copies`)."""
    videos = [name for name, v in manifest.videos.items() if v.fold in groups]
    counts = [manifest.videos[name].tracks.get(track) for name in videos]
    frames = sum(c.samples for c in counts if c)
    read = np.array([float(frames)])
    au_copies = None
    if track == "au" and cfg.au_balance == "rare":
        au_copies = rare_au_copies(np.sum([c.counts for c in counts if c], 0), cfg.max_repeat)
    return Plan({}, read, read, np.ones(1), 0.0, au_copies)


def resampling_plan(
    manifest: Manifest, groups: list[str], cfg: DataConfig, inputs: tuple[str, ...] = PACKED,
    tracks: tuple[str, ...] = ("expr",),
) -> Plan:  # fmt: skip
    """Each (video, class)'s expected copies of a read sample (`plan`), over the frames the stream
    keeps for a model taking `inputs`; a run of another track than expressions reads its frames
    once each (`natural_plan`)."""
    if "expr" not in tracks:
        return natural_plan(manifest, groups, tracks[0], cfg)
    usable = usable_patterns(cfg, inputs)
    counts = {
        name: np.asarray(v.window_patterns)[:, usable].sum(1) for name, v in manifest.videos.items() if v.fold in groups
    }
    return plan(
        counts,
        cfg.balance,
        weights=cfg.class_weights or None,
        keep=cfg.subsample or None,
        caps=cfg.video_cap or None,
        max_repeat=cfg.max_repeat,
    )


def expected_thrown_away(manifest: Manifest, groups: list[str], plan: Plan) -> float:
    """Expected share of read samples never decoded: no pure window, or no copy."""
    total = sum(manifest.groups[g].samples for g in groups)
    return float(1 - plan.read.sum() * (1 - plan.discarded_fraction) / max(1, total))


def batches_per_epoch(plan: Plan, cfg: DataConfig, world: int, multiple: int = 1) -> int:
    """Batches per rank per epoch, a whole number of `multiple`s (gradient accumulation)."""
    frames = cfg.epoch_samples or plan.emitted.sum()
    per_batch = cfg.batch_size * max(1, cfg.sequence_length)
    return max(1, int(frames) // (per_batch * world * multiple)) * multiple
