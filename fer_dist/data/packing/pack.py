"""Packs Aff-Wild2-layout data into WebDataset shards and their manifest.

Two passes, both resumable. Pass 1 turns each video into a spool tar of its samples in frame
order (in parallel over videos; a video's audio is decoded and its log-mel computed once). Pass 2
cuts the spools into clips of consecutive frames, shuffles the clips of each fold group with a
fixed seed and streams them into the groups' shards (`format.shard_name`). Every file appears
under its final name only when complete, so a killed run resumes where it stopped and produces
the same bytes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg

from fer_dist.console import console, out, print_table
from fer_dist.data.packing import audio
from fer_dist.data.packing.layout import (
    VIDEO_SUFFIXES,
    Video,
    list_crops,
    other_images,
    read_annotation,
    recorded_prefer,
)
from fer_dist.data.packing.workers import completed, in_order
from fer_dist.data.packing.workers import pool as workers_pool
from fer_dist.data.shards.format import (
    FORMAT_VERSION,
    LABEL,
    MEMBERS,
    META,
    Group,
    Manifest,
    MelStats,
    PackParams,
    Quality,
    SampleMeta,
    Shard,
    Totals,
    TrackCounts,
    VideoRecord,
    atomic_write,
    claim,
    fold_group,
    group_fold,
    label_counts,
    npy_bytes,
    npy_header,
    sample_key,
    shard_name,
    whole_jpeg,
    writing,
)
from fer_dist.data.shards.survey import show_quality, show_tracks
from fer_dist.data.shards.tars import TAR_END, tar_record
from fer_dist.data.shards.windows import NAMES, SILENCE, WAVE_RATE, WAVE_WIDTH, WIDEST, purity_flags
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, NUM_CLASSES, UNLABELLED
from fer_dist.tracks import TRACKS


def assign_folds(videos: list[Video], scheme: str, n_folds: int, seed: int) -> dict[str, str]:
    """Video name -> group name (`fold{k}` or `test`). Faces of one parent video share a group.

    video5: train and validation videos together, n_folds folds by parent video (paper 001);
    train4+val: n_folds - 1 folds from train, the official validation set is the last (paper 004);
    official: train is fold0, validation is fold1.
    """
    groups: dict[str, str] = {}
    by_parent: dict[tuple[str, str], list[Video]] = {}
    for v in videos:
        if v.split == "test":
            groups[v.name] = "test"
            continue
        pool = v.split if scheme != "video5" else "trainval"
        by_parent.setdefault((pool, v.parent), []).append(v)
    rng = np.random.default_rng(seed)
    parents = sorted(by_parent)
    order = [parents[i] for i in rng.permutation(len(parents))]
    for i, (pool, parent) in enumerate(
        sorted(order, key=lambda pp: pp[0] != "train" if scheme == "train4+val" else False)
    ):
        if scheme == "official":
            fold = 0 if pool == "train" else 1
        elif scheme == "train4+val":
            fold = n_folds - 1 if pool == "val" else i % (n_folds - 1)
        else:
            fold = i % n_folds
        for v in by_parent[(pool, parent)]:
            groups[v.name] = fold_group(fold)
    return groups


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) px of a whole JPEG that decodes, else None."""
    if not whole_jpeg(data):
        return None
    try:
        return tuple(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape[1:])
    except RuntimeError:
        return None


class Crops:
    """A video's crop files, each read and validated at most once: corrupt or truncated crops
    count as missing, and a crop no packed frame needs is never decoded."""

    def __init__(self, folder: Path | None) -> None:
        self.files = list_crops(folder)
        self.other_images = other_images(folder)  # `NNNNN.png` and the like, never packed
        self.readable: dict[int, bytes] = {}
        self.sizes: dict[int, tuple[int, int]] = {}  # (height, width) px of each readable crop
        self.corrupt: set[int] = set()
        self.not_jpeg = 0  # corrupt crops whose bytes are not JPEG at all (a PNG named .jpg)

    def read(self, f: int) -> bool:
        if f in self.readable:
            return True
        if f in self.corrupt or f not in self.files:
            return False
        data = self.files[f].read_bytes()
        size = jpeg_size(data)
        if size is None:
            self.corrupt.add(f)
            self.not_jpeg += data[:2] != b"\xff\xd8"
            return False
        self.readable[f], self.sizes[f] = data, size
        return True

    def read_own(self, frames: np.ndarray) -> None:
        """The packed frames' own crops; when none has one, the first readable crop (to fill them)."""
        for f in frames.tolist():
            self.read(f)
        if not self.readable:
            next((f for f in sorted(self.files) if self.read(f)), None)

    def nearest(self, f: int) -> int:
        """The nearest readable crop to frame f (the earlier one on a tie), validated lazily."""
        for d in range(1, max(f, max(self.files)) + 1):
            found = [g for g in (f - d, f + d) if self.read(g)]
            if found:
                return found[0]
        raise ValueError(f"no readable crop near frame {f}")


def timing_drift(times: list[Fraction]) -> float:
    """The largest departure (s) of a frame's timestamp from a constant frame rate from the first
    frame on: 0 for a constant-rate video (timestamps rounded to a coarse time base, such as
    Matroska's milliseconds, included), the length of a recorder's stall, the drift of a clock
    whose frames come slower or faster than their rate. The constant rate is the mean of the
    intervals between frames that lie within half of their median (a stall is not one of them)."""
    if len(times) < 2:
        return 0.0
    t = np.array([float(x - times[0]) for x in times])
    intervals = np.diff(t)
    typical = np.median(intervals)
    step = intervals[np.abs(intervals - typical) <= typical / 2].mean()
    return float(np.abs(t - np.arange(len(t)) * step).max())


def quality_of(
    media: audio.Media, times: list[Fraction], labels: int, crops: Crops, rate: int, frames_from: str
) -> Quality:
    """What is odd about a video, counted (the manifest's `Quality`): its frame count and timing,
    its file's damage, its sound against its frames (`times`; the sound at `rate` Hz), its
    `labels` and its crops against its frames, and the crops' sizes."""
    video = times[: media.frames]
    sound = media.audio is not None and bool(video)
    start, end = media.audio_start, len(media.audio) / rate if sound else 0.0
    seconds = audio.seconds(video)
    heights, widths = [h for h, _ in crops.sizes.values()], [w for _, w in crops.sizes.values()]
    return Quality(
        video_frames=media.frames,
        header_frames=media.header_frames,
        timing="timestamps" if media.timed and media.frames else "assumed rate",
        timing_drift_s=round(timing_drift(video), 4),
        damage=media.damage or "",
        frames_from=frames_from,
        empty_audio=media.empty_audio,
        audio_s=round(media.sound_heard, 4) if sound else 0.0,
        audio_late_s=round(max(0.0, start - seconds[0]), 4) if sound else 0.0,
        audio_early_end_s=round(max(0.0, seconds[-1] - end), 4) if sound else 0.0,
        sound_gaps_s=round(media.sound_gaps, 4),
        frames_before_sound=int((seconds < start).sum()) if sound else 0,
        frames_after_sound=int((seconds >= end).sum()) if sound else 0,
        labels_past_end=max(0, labels - media.frames) if media.frames and frames_from == "annotation" else 0,
        crops_past_end=sum(f > media.frames for f in crops.files) if media.frames else 0,
        not_jpeg_crops=crops.not_jpeg + crops.other_images,
        frames_lost=media.frames_lost,
        sound_lost_s=round(media.sound_lost, 4),
        crop_width=[min(widths, default=0), max(widths, default=0)],
        crop_height=[min(heights, default=0), max(heights, default=0)],
    )


def test_frames(media: audio.Media, crops: Crops) -> tuple[int, str]:
    """How many frames a test video's submission needs, and where that count comes from: the
    video's frames; the header's count when the file is damaged short of it; the last crop's
    number when the video cannot be read."""
    if media.damage and media.header_frames > media.frames:
        return media.header_frames, "header"
    if media.frames:
        return media.frames, "video"
    return max(crops.files, default=0), "crops"


@dataclass(frozen=True)
class FrameLabels:
    """A video's labels of frames 1..n (index i holds frame i + 1), one array per track it carries,
    each in its track's convention (`fer_dist/tracks.py`), and what set n."""

    tracks: dict[str, np.ndarray]  # track name -> [n] or [n, width] labels, `missing` where none
    n: int  # frames: the longest annotation file's, or a test video's count (`test_frames`)
    frames_from: str  # annotation | video | header | crops

    @property
    def expression(self) -> np.ndarray:
        """[n] int8 expression labels, `UNLABELLED` where none (everywhere when the video has none):
        what the audio windows' purity and the class counts are taken from."""
        return self.tracks["expr"] if "expr" in self.tracks else np.full(self.n, UNLABELLED, np.int8)

    def annotated(self) -> np.ndarray:
        """[n] bool: the frames labelled for at least one track."""
        hit = np.zeros(self.n, bool)
        for name, labels in self.tracks.items():
            hit |= TRACKS[name].annotated(labels)
        return hit


def frame_labels(video: Video, media: audio.Media, crops: Crops) -> FrameLabels:
    """The labels of every track `video` carries, over the frames of its longest annotation file
    (a shorter file's missing lines read as "not annotated"); for a test video, whose every frame
    needs a prediction, none, over `test_frames`'s count. Raises LayoutError (`read_annotation`) for
    an annotation file that cannot be read as one."""
    if not video.annotations:
        return FrameLabels({}, *test_frames(media, crops))
    read = {name: read_annotation(path, TRACKS[name]) for name, path in video.annotations.items()}
    n = max(len(labels) for labels in read.values())
    padded = {}
    for name, labels in read.items():
        padded[name] = TRACKS[name].empty(n)
        padded[name][: len(labels)] = labels
    return FrameLabels(padded, n, "annotation")


@dataclass(frozen=True)
class Selection:
    """Which of a video's frames are packed, and which crop each takes."""

    frames: np.ndarray  # [samples] int64: the packed frames (1-based), ascending
    source: np.ndarray  # [samples] int64: the frame whose crop each takes: itself, or the nearest readable crop
    own: np.ndarray  # [k] int64: the frames whose crop was found readable before any filling, ascending
    dropped: dict[str, int]  # why frames were dropped -> how many (a reason checked and met by none: 0)


def select_frames(labelled: np.ndarray, split: str, crops: Crops, missing: str) -> Selection:
    """The frames to pack: the labelled ones ([n] bool `labelled`, 1-based frames: labelled for any
    track), or every frame of a test video. A frame without a readable crop of its own takes the nearest readable crop
    (`Crops.nearest`); with `missing` "skip" it is dropped instead, except in a test video, whose
    every frame needs a prediction; in a video without any readable crop every frame is dropped.
    Reads the crops it needs (`Crops.read_own`), so that `crops` counts them afterwards."""
    n = len(labelled)
    frames = np.flatnonzero(labelled) + 1 if split != "test" else np.arange(1, n + 1)
    crops.read_own(frames)
    own = np.array(sorted(crops.readable), dtype=np.int64)
    dropped: dict[str, int] = {}
    if not crops.readable:
        dropped["no readable crop in the video"] = len(frames)
        keep = np.zeros(len(frames), bool)
    elif missing == "skip" and split != "test":
        keep = np.isin(frames, own)
        dropped["no crop (--missing skip)"] = int((~keep).sum())
    else:
        keep = np.ones(len(frames), bool)
    frames = frames[keep]
    source = np.array([f if f in crops.readable else crops.nearest(f) for f in frames.tolist()])
    return Selection(frames, source.astype(np.int64) if len(source) else frames, own, dropped)


@dataclass(frozen=True)
class MelSums:
    """A video's log-mel values of the frames that hear its sound, summed: what the manifest's
    `mel_stats` (their mean and std over all videos, `mel_stats`) is computed from. Kept beside the
    video's record (in `work/<video>.json`), never in the manifest."""

    mel_sum: float  # the values' sum (natural-log mel power)
    mel_sumsq: float  # their squares' sum
    mel_count: int  # how many values: n_mels x the frames inside the sound


@dataclass(frozen=True)
class FrameAudio:
    """A video's sound laid out frame by frame, for frames 1..n (n labels)."""

    times: list[Fraction]  # [n, fewer when frames lie past the video's end] s: each frame's own time
    columns: np.ndarray  # [n_mels, n + 2 * WIDEST] float16 log-mel: column WIDEST + i - 1 is frame i's
    pads: np.ndarray  # [n, 2] int64: silent columns of each frame's widest window, before and after
    windows: np.ndarray  # [n, len(NAMES)] bool: which windows pass their label-purity threshold
    audio: bool  # the video has sound (False: packed silent, every column silence)
    pcm: np.ndarray | None  # [samples] int16 16-bit PCM at WAVE_RATE, empty when silent; None: not packed
    sums: MelSums


def frame_audio(media: audio.Media, labels: np.ndarray, params: PackParams) -> FrameAudio:
    """`media`'s log-mel (`params.mel`) sampled at each frame's own timestamp, one column per
    frame of the [n] `labels`; frames past the video's end (an annotation longer than its video)
    are outside it: silence, like the columns before frame 1. The sums count the columns of the
    frames inside the sound. With `params.audio_wave`, also the sound at WAVE_RATE as 16-bit PCM,
    resampled straight from the same decoded frames."""
    n = len(labels)
    times = audio.frame_times(media, n)
    heard = audio.heard(times, media.audio, media.audio_start, params.mel.sample_rate)
    mel = audio.log_mel(media.audio, params.mel) if media.audio is not None else None
    columns = audio.frame_columns(mel, audio.seconds(times), n, params.mel)
    inside = columns[:, WIDEST : WIDEST + len(times)][:, heard].astype(np.float64)
    pcm = None
    if params.audio_wave:
        pcm = audio.pcm16(media.resampled[WAVE_RATE]) if mel is not None else np.zeros(0, np.int16)
    return FrameAudio(
        times=times,
        columns=columns.astype(np.float16),
        pads=audio.padding(heard, n),
        windows=purity_flags(labels),
        audio=mel is not None,
        pcm=pcm,
        sums=MelSums(float(inside.sum()), float((inside**2).sum()), int(inside.size)),
    )


def spool_samples(
    video: Video,
    group: str,
    fps: Fraction,
    labels: FrameLabels,
    chosen: Selection,
    crops: Crops,
    sound: FrameAudio,
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Each packed frame (1-based, in frame order) with its sample's members: the crop's JPEG bytes
    as they are, the widest log-mel window (float16 .npy), the expression label, the metadata
    (`SampleMeta`, with the frame's action units and valence-arousal when it has them) and, when
    `sound.pcm` is packed, the widest waveform window (int16 .npy; silence for a frame past the
    video's end)."""
    expression = labels.expression
    au, va = (labels.tracks.get(t) for t in ("au", "va"))
    header = npy_header((sound.columns.shape[0], 2 * WIDEST), np.float16)
    wave_header = npy_header((WAVE_WIDTH,), np.int16)
    silent_wave = np.zeros(WAVE_WIDTH, np.int16)
    for f, src in zip(chosen.frames.tolist(), chosen.source.tolist(), strict=True):
        label = int(expression[f - 1])
        meta = SampleMeta(
            video=video.name,
            frame=f,
            label=label,
            split=video.split,
            fold=group,
            fps=float(fps),
            windows={name: bool(sound.windows[f - 1, k]) for k, name in enumerate(NAMES)},
            audio=sound.audio,
            pad=sound.pads[f - 1].tolist(),
            filled_from=None if src == f else src,
            au=au[f - 1].tolist() if au is not None and TRACKS["au"].annotated(au[f - 1 : f])[0] else None,
            va=va[f - 1].tolist() if va is not None and TRACKS["va"].annotated(va[f - 1 : f])[0] else None,
        )
        members = {
            MEMBERS["image"]: crops.readable[src],
            MEMBERS["audio"]: header + audio.window(sound.columns, f).tobytes(),
            LABEL: str(label).encode(),
            META: meta.to_bytes(),
        }
        if sound.pcm is not None:
            wave = audio.wave_window(sound.pcm, sound.times[f - 1]) if f <= len(sound.times) else silent_wave
            members[MEMBERS["wave"]] = wave_header + wave.tobytes()
        yield f, members


def write_spool(work: Path, name: str, samples: Iterable[tuple[int, dict[str, bytes]]]) -> None:
    """Writes video `name`'s `samples` (frame, members; in frame order) as `work/<name>.tar`, one
    tar record per sample (`tar_record`), and its index `work/<name>.idx.npy`: [samples, 3] int64
    rows of frame, byte offset and byte length of the sample's record, which pass 2 copies by.
    Each file appears under its name only when complete."""
    extents = []
    tmp = work / f"{name}.tar.tmp"
    with writing(tmp), open(tmp, "wb") as fh:
        for f, members in samples:
            record = tar_record(sample_key(name, f), members)
            extents.append((f, fh.tell(), len(record)))
            fh.write(record)
        fh.write(TAR_END)
    os.replace(tmp, work / f"{name}.tar")
    atomic_write(work / f"{name}.idx.npy", npy_bytes(np.array(extents, np.int64).reshape(-1, 3)))


def window_patterns(labels: np.ndarray, flags: np.ndarray) -> list[list[int]]:
    """`[class][pattern]` sample counts, pattern = s + 2 m + 4 l: lets the stream know each class's
    share after any choice of usable windows without reading a shard."""
    pattern = flags @ (1 << np.arange(flags.shape[1]))
    valid = labels >= 0
    out = np.zeros((NUM_CLASSES, 1 << flags.shape[1]), np.int64)
    np.add.at(out, (labels[valid], pattern[valid]), 1)
    return out.tolist()


def track_counts(name: str, labels: np.ndarray, frames: np.ndarray) -> TrackCounts:
    """Track `name`'s counts in a video (`format.TrackCounts`): its [n] or [n, width] `labels`, the
    packed `frames` (1-based)."""
    t = TRACKS[name]
    packed = labels[frames - 1][t.annotated(labels[frames - 1])]
    return TrackCounts(int(t.annotated(labels).sum()), len(packed), label_counts(name, packed))


def carried(labels: FrameLabels, frames: np.ndarray) -> dict[str, int]:
    """The packed `frames` (1-based) counted by the tracks each carries, keyed "expr,au" (registry
    order); frames carrying none (a test video's) are not counted."""
    hits = {name: TRACKS[name].annotated(values)[frames - 1] for name, values in labels.tracks.items()}
    keys = [",".join(name for name, hit in hits.items() if hit[i]) for i in range(len(frames))]
    return dict(sorted(collections.Counter(k for k in keys if k).items()))


def video_record(
    video: Video,
    group: str,
    media: audio.Media,
    labels: FrameLabels,
    chosen: Selection,
    crops: Crops,
    sound: FrameAudio,
    sample_rate: int,
) -> VideoRecord:
    """The manifest's record of a packed video: its labelled frames and those with their own crop,
    per expression class; per track it carries, its split and counts (`track_counts`); what was
    packed (`chosen`), filled and dropped; its sound; and what is odd about it (`quality_of`, the
    sound at `sample_rate` Hz)."""
    n, expression = labels.n, labels.expression
    frames = chosen.frames
    packed = expression[frames - 1]
    all_labelled = expression[expression != UNLABELLED]
    with_crop = np.isin(np.arange(1, n + 1), chosen.own) & (expression != UNLABELLED)  # own readable crop
    return VideoRecord(
        split=video.split,
        fold=group,
        parent=video.parent,
        fps=float(media.fps or audio.ASSUMED_FPS),
        fps_source="container" if media.fps else "assumed",
        frames=n,
        audio=sound.audio,
        audio_error=media.error,
        labelled=int(len(all_labelled)),
        with_crop=int(with_crop.sum()),
        with_crop_class_counts=np.bincount(expression[with_crop], minlength=NUM_CLASSES).tolist(),
        samples=int(len(frames)),
        filled=int((chosen.source != frames).sum()),
        corrupt_crops=len(crops.corrupt),
        dropped=dict(chosen.dropped),
        class_counts=np.bincount(packed[packed >= 0], minlength=NUM_CLASSES).tolist(),
        labelled_class_counts=np.bincount(all_labelled, minlength=NUM_CLASSES).tolist(),
        window_counts=sound.windows[frames - 1].sum(0).tolist(),
        window_patterns=window_patterns(packed, sound.windows[frames - 1]),
        quality=quality_of(media, sound.times, n, crops, sample_rate, labels.frames_from),
        tracks={name: track_counts(name, values, frames) for name, values in labels.tracks.items()},
        splits=dict(video.splits),
        carried=carried(labels, frames),
    )


def write_packed(path: Path, record: VideoRecord, sums: MelSums) -> None:
    """A packed video's record and log-mel sums as one JSON object (`path`, `work/<video>.json`):
    the record's fields, then the sums'. Its presence marks the video's spool as complete."""
    atomic_write(path, json.dumps({**asdict(record), **asdict(sums)}).encode())


def read_packed(path: Path) -> tuple[VideoRecord, MelSums]:
    """What `write_packed` wrote to `path`."""
    raw = json.loads(path.read_text())
    sums = MelSums(**{f.name: raw.pop(f.name) for f in fields(MelSums)})
    return VideoRecord.from_dict(raw), sums


def pack_video(job: tuple[Video, str, PackParams, Path]) -> tuple[str, VideoRecord, MelSums]:
    """Pass 1 for one video (`job`: the video, its fold group, the packing parameters and the work
    folder): writes its spool, `work/<video>.tar` (samples in frame order) and `.idx.npy`, then
    `work/<video>.json`; returns its name, record and log-mel sums. A video whose `.json` is there
    is not packed again: what it holds is returned. Raises LayoutError for an annotation file that
    cannot be read."""
    video, group, params, work = job
    done = work / f"{video.name}.json"
    if done.exists():
        return video.name, *read_packed(done)
    crops = Crops(video.crops)
    media = audio.read_media(video.media, params.mel.sample_rate, also=(WAVE_RATE,) if params.audio_wave else ())
    labels = frame_labels(video, media, crops)
    chosen = select_frames(labels.annotated(), video.split, crops, params.missing)
    sound = frame_audio(media, labels.expression, params)
    fps = media.fps or audio.ASSUMED_FPS
    write_spool(work, video.name, spool_samples(video, group, fps, labels, chosen, crops, sound))
    record = video_record(video, group, media, labels, chosen, crops, sound, params.mel.sample_rate)
    write_packed(done, record, sound.sums)
    return video.name, record, sound.sums


def clips(frames: np.ndarray, clip_len: int) -> list[tuple[int, int]]:
    """[start, end) index ranges of runs of consecutive frames, cut to at most clip_len."""
    breaks = np.flatnonzero(np.diff(frames) != 1) + 1
    out = []
    for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(frames)], strict=True):
        out += [(int(s), int(min(s + clip_len, end))) for s in range(start, end, clip_len)]
    return out


def group_plan(
    records: dict[str, VideoRecord], group: str, params: PackParams, work: Path
) -> tuple[list[tuple[str, int, int]], dict[str, np.ndarray]]:
    """The group's clips in their shuffled order, (video, start, end) over each video's spool index
    rows (frame, offset, length); memory grows with the group's clips, not with its frames' bytes."""
    index = {
        name: np.load(work / f"{name}.idx.npy", allow_pickle=False)
        for name in sorted(records)
        if records[name].fold == group
    }
    all_clips = [(name, s, e) for name, rows in index.items() for s, e in clips(rows[:, 0], params.clip_len)]
    fold = group_fold(group)
    tag = 1000 if fold is None else fold
    order = np.random.default_rng([params.seed, tag]).permutation(len(all_clips))
    return [all_clips[i] for i in order], index


def write_group(job: tuple[str, dict[str, VideoRecord], PackParams, Path, Path]) -> list[dict]:
    """Pass 2 for one fold group: copies each sample's tar records from its spool, clip by clip;
    returns the group's shards with their sample counts."""
    group, records, params, work, out = job
    plan, index = group_plan(records, group, params, work)
    total = sum(e - s for _, s, e in plan)
    rows = ((name, i) for name, s, e in plan for i in range(s, e))
    shards = []
    with contextlib.ExitStack() as stack:
        spools = {}
        for k, begin in enumerate(range(0, total, params.samples_per_shard)):
            chunk = itertools.islice(rows, params.samples_per_shard)
            path = out / shard_name(group, k)
            shards.append({"name": path.name, "samples": min(params.samples_per_shard, total - begin)})
            if path.exists():
                collections.deque(chunk, maxlen=0)  # already written by an earlier run
                continue
            tmp = path.with_name(path.name + ".tmp")
            with writing(tmp), open(tmp, "wb") as fh:
                for name, i in chunk:
                    if name not in spools:
                        spools[name] = stack.enter_context(open(work / f"{name}.tar", "rb"))
                    _, offset, length = index[name][i]
                    spools[name].seek(int(offset))
                    fh.write(spools[name].read(int(length)))
                fh.write(TAR_END)
            os.replace(tmp, path)
    return shards


def problems(records: dict[str, VideoRecord]) -> list[str]:
    """What a user must hear about: nothing is dropped, degraded or placed unusually without a
    line here. Quirks that real Aff-Wild2 has in many videos (one annotation line past the last
    frame, crops of varying size in `cropped/`) get one line for all of them."""
    out, one_label_past, sizes = [], [], []
    for name, r in sorted(records.items()):
        if r.audio_error == "no video file":
            out.append(
                f"{name}: no video file found for its audio (looked for {r.parent} with a suffix of "
                f"{', '.join(VIDEO_SUFFIXES)}); packed silent"
            )
        elif r.audio_error:
            out.append(f"{name}: video unreadable ({r.audio_error}); packed silent")
        elif not r.audio and not r.quality.empty_audio:
            out.append(f"{name}: the video has no audio stream; packed silent")
        for track, counts in r.tracks.items():
            if not counts.labelled:
                t = TRACKS[track]
                out.append(f"{name}: its {t.title} file annotates no frame (a header alone, or {t.missing} each row)")
        if r.corrupt_crops:
            out.append(f"{name}: {r.corrupt_crops} corrupt crop(s) treated as missing")
        for reason, count in r.dropped.items():
            if count:
                out.append(f"{name}: {count} frame(s) dropped: {reason}")
        if r.fps_source == "assumed":
            out.append(f"{name}: frame rate unknown, assumed {float(audio.ASSUMED_FPS):g} fps")
        q = r.quality
        for quirk, sentence in q.quirks(r.fps).items():
            if quirk == "labels past the end" and q.labels_past_end == 1:
                one_label_past.append(name)
            elif quirk == "crop sizes":
                sizes.append(q)
            else:
                out.append(f"{name}: {sentence}")
    if one_label_past:
        out.append(
            f"{len(one_label_past)} video(s) have one annotation line past their last frame, as many Aff-Wild2 "
            f"files do (e.g. {one_label_past[0]}); that label is kept, filled from the nearest crop"
        )
    if sizes:
        width = (min(q.crop_width[0] for q in sizes), max(q.crop_width[1] for q in sizes))
        height = (min(q.crop_height[0] for q in sizes), max(q.crop_height[1] for q in sizes))
        out.append(
            f"{len(sizes)} video(s) have crops of varying size ({width[0]}-{width[1]} x {height[0]}-{height[1]} px); "
            "the loader workers bring a batch holding crops of different sizes to the model's image_size"
        )
    return out


def mel_stats(sums: list[MelSums]) -> MelStats:
    """The mean and std of the log-mel values of every video's frames inside its sound, from the
    videos' `sums`: exactly rounded (`math.fsum`), so the same whatever their order; silence's
    value and 1 when no video has sound."""
    count = sum(s.mel_count for s in sums)
    mean = math.fsum(s.mel_sum for s in sums) / max(count, 1)
    var = math.fsum(s.mel_sumsq for s in sums) / max(count, 1) - mean**2
    return MelStats(mean, float(np.sqrt(max(var, 1e-12)))) if count else MelStats(SILENCE, 1.0)


def summed_tracks(records: list[VideoRecord]) -> dict[str, TrackCounts]:
    """The videos' per-track counts added up, by track (in registry order)."""
    out = {}
    for name in TRACKS:
        parts = [r.tracks[name] for r in records if name in r.tracks]
        if parts:
            counts = np.sum([p.counts for p in parts], axis=0).astype(int).tolist()
            out[name] = TrackCounts(sum(p.labelled for p in parts), sum(p.samples for p in parts), counts)
    return out


def manifest_of(
    records: dict[str, VideoRecord],
    sums: dict[str, MelSums],
    shards: dict[str, list[dict]],
    params: PackParams,
    stamp: dict | None = None,
) -> Manifest:
    """The manifest of the packed videos' `records` (by video), their log-mel `sums` (by video)
    and each group's `shards` (name and samples); the same whatever order the videos finished in
    (records are taken sorted by video and the log-mel sums exactly rounded, so a resumed packing
    gives the same bytes)."""
    records = dict(sorted(records.items()))
    groups = {}
    for group, group_shards in sorted(shards.items()):
        members = [r for r in records.values() if r.fold == group]
        groups[group] = Group(
            shards=[Shard(**s) for s in group_shards],
            samples=sum(s["samples"] for s in group_shards),
            class_counts=np.sum([r.class_counts for r in members], axis=0).astype(int).tolist(),
            window_patterns=np.sum([r.window_patterns for r in members], axis=0).astype(int).tolist(),
            videos=len(members),
            tracks=summed_tracks(members),
            carried=dict(sorted(sum((collections.Counter(r.carried) for r in members), collections.Counter()).items())),
        )

    def total(key: str) -> int | list[int]:
        values = [getattr(r, key) for r in records.values()]
        return np.sum(values, axis=0).astype(int).tolist() if values else 0

    dropped: collections.Counter = collections.Counter()
    for r in records.values():
        dropped.update(r.dropped)
    totals = Totals(
        videos=len(records),
        samples=total("samples"),
        labelled=total("labelled"),
        with_crop=total("with_crop"),
        filled=total("filled"),
        corrupt_crops=total("corrupt_crops"),
        videos_without_audio=sorted(n for n, r in records.items() if not r.audio),
        dropped=dict(dropped),
        class_counts=total("class_counts"),
        labelled_class_counts=total("labelled_class_counts"),
        with_crop_class_counts=total("with_crop_class_counts"),
        tracks=summed_tracks(list(records.values())),
    )
    tracks = [name for name in TRACKS if name in totals.tracks] or ["expr"]
    manifest = Manifest(
        format=FORMAT_VERSION if tracks != ["expr"] else 2 if params.audio_wave else 1,
        classes=list(CLASSES),
        params=params,
        mel_stats=mel_stats([sums[name] for name in sorted(sums)]),
        totals=totals,
        problems=problems(records),
        groups=groups,
        videos=records,
        stamp=stamp,
        members=list(params.inputs()),
        tracks=tracks,
    )
    empty = manifest.empty(sorted(groups), tuple(tracks))
    if empty:
        manifest.problems.append(f"{empty}; such a group can be neither held out nor trained on")
    for name in tracks if len(tracks) > 1 else ():
        lacking = [g for g in manifest.fold_groups() if groups[g].samples and not manifest.frames_of(g, (name,))]
        if lacking:
            manifest.problems.append(
                f"{', '.join(lacking)} hold(s) no frames of {TRACKS[name].title}: a run of that track can neither "
                "hold it out nor train on it (pack more videos, or fewer --n-folds)"
            )
    return manifest


def worker_context() -> multiprocessing.context.BaseContext:
    """How packing workers start: from a forkserver, so that they never inherit a parent's OpenMP
    state (torch's STFT in a forked child deadlocks once the parent has run a parallel region).
    The server imports this module once, before it runs anything, so that each worker starts
    without importing torch again."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def fingerprint(videos: list[Video]) -> str:
    """What packing reads, summarised: each video's annotation bytes, its crop files' names and
    sizes, and its media file's name and size (not modification times: a copy of the same data
    packs to the same bytes). A second packing into a folder after any of them changed is refused,
    not answered with the shards of the old files."""
    digest = hashlib.sha256()
    for v in sorted(videos, key=lambda v: v.name):
        digest.update(f"{v.name}\n".encode())
        for name, path in v.annotations.items():  # an expression file's digest alone, as in earlier packings
            tag = b"" if name == "expr" else f"{name}\n".encode()
            digest.update(tag + hashlib.sha256(path.read_bytes()).digest())
        if v.crops is not None:
            with os.scandir(v.crops) as entries:
                digest.update("".join(sorted(f"{e.name}:{e.stat().st_size}\n" for e in entries)).encode())
        if v.media is not None:
            digest.update(f"{v.media.name}:{v.media.stat().st_size}\n".encode())
    return digest.hexdigest()


def check_annotations(videos: list[Video]) -> None:
    """Reads every annotation file of `videos` (each track's), so that one that cannot be read is
    refused before anything is written, not after some videos were packed. Raises LayoutError
    (`read_annotation`) for the first, in the videos' order."""
    for video in videos:
        for name, path in video.annotations.items():
            read_annotation(path, TRACKS[name])


def pack(
    videos: list[Video],
    out: Path,
    params: PackParams,
    workers: int = 1,
    progress: Callable[[str, int], None] | None = None,
    prefer: list[str] | None = None,
) -> Manifest:
    """Packs `videos` into shards under `out`; returns the manifest (also written to manifest.json),
    whose stamp records `prefer` (the `--prefer` folders `videos` were found with, `layout.discover`)
    when given, for the commands that find the videos again.
    Every annotation file is read first (`check_annotations`): a refused one writes nothing. Work
    left in `out` by a run that stopped is resumed, or started over when the inputs or settings
    changed since (`format.claim`). Raises LayoutError for an input that cannot be read, InputError
    for a folder holding other shards, and OSError (one a worker met too) with the work kept."""
    out = Path(out)
    check_annotations(videos)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(v.name for v in videos)
    stamp = {"params": asdict(params), "videos": names, "inputs": fingerprint(videos)}
    stamp = json.loads(json.dumps({**stamp, "prefer": recorded_prefer(prefer)} if prefer else stamp))
    done = claim(out, "stamp", stamp, InputError, "shards")
    if done is not None:
        console.print(f"{out} holds the shards of these very inputs and settings: kept, nothing packed again")
        return done
    work = out / ".work"
    resumed = sum((work / f"{v.name}.json").exists() for v in videos)
    if resumed:
        console.print(f"resuming: {resumed} of {len(videos)} videos were packed before, in {work}")
    groups = assign_folds(videos, params.folds, params.n_folds, params.seed)
    records: dict[str, VideoRecord] = {}
    sums: dict[str, MelSums] = {}
    try:
        with workers_pool(workers, worker_context(), torch.set_num_threads, (1,)) as pool:
            jobs = [(v, groups[v.name], params, work) for v in videos]
            for name, record, mel in completed(pool, pack_video, jobs):
                records[name], sums[name] = record, mel
                if progress:
                    progress("videos", record.samples)
            names = sorted(set(groups.values()))
            jobs2 = [(g, records, params, work, out) for g in names]
            shards = dict(zip(names, in_order(pool, write_group, jobs2), strict=True))
    except OSError as exc:
        for tmp in [*out.glob("*.tmp"), *work.glob("*.tmp")]:  # a worker's unfinished file, killed mid-write
            tmp.unlink(missing_ok=True)
        console.print(f"[yellow]packing stopped:[/] {work} keeps each video packed so far; the same command resumes")
        if exc.errno == errno.ENOSPC:
            console.print(
                "[yellow]packing needs room for the videos packed so far (in .work) and the shards together: "
                "about twice the shards' size, until the shards are written and .work is removed[/]"
            )
        raise
    manifest = manifest_of(records, sums, shards, params, stamp)
    for v in videos:
        for lost in v.passed_over:
            taken = v.crops if lost.is_dir() else v.media
            why = "(the .mp4 beside it)" if lost.parent == taken.parent else "(--prefer)"
            manifest.problems.append(f"{v.name}: {taken} packed, not {lost} {why}")
    manifest.write(out)
    shutil.rmtree(work)
    return manifest


def show(manifest: Manifest) -> None:
    """What was packed: the paper's Table 1 for these data (when they hold expressions), the
    totals, the frames per track, the data-quality table, and every warning."""
    t = manifest.totals
    if "expr" in manifest.tracks:
        show_classes(t)
    out.print(
        f"{t.videos} videos, {t.samples} samples; {t.filled} frames filled from the nearest crop; "
        f"{t.corrupt_crops} corrupt crops; {len(t.videos_without_audio)} videos packed without audio; "
        f"dropped: {', '.join(f'{n} ({r})' for r, n in t.dropped.items() if n) or 'none'}"
    )
    groups = ", ".join(f"{g} {v.samples} ({len(v.shards)} shards)" for g, v in manifest.groups.items())
    out.print(f"groups: {groups}")
    if manifest.tracks != ["expr"]:
        show_tracks(manifest)
    show_quality(manifest)
    for line in manifest.problems:
        console.print(f"[yellow]warning:[/] {line}")


def show_classes(t: Totals) -> None:
    """The paper's Table 1 for these data: each class's labelled frames, those with a crop, and
    those packed."""
    rows = [
        {
            "class": name,
            "all": t.labelled_class_counts[c],
            "crop": t.with_crop_class_counts[c],
            "packed": t.class_counts[c],
        }
        for c, name in enumerate(CLASSES)
    ]
    rows.append({"class": "total", "all": t.labelled, "crop": t.with_crop, "packed": sum(t.class_counts)})
    columns = {"class": "class", "all": "all labelled", "crop": "with a crop", "packed": "packed"}
    print_table("labelled frames per class", columns, rows)
