"""Feature shards: a twin of every packed shard whose samples carry per-frame features, for the
models of papers 001 and 004 and the recipe's `face_voice_temporal_features`.

Every shard gets a twin of the same name with the same keys in the same order (clips stay clips):

- `jpg`, `cls`, `json` copied byte for byte (paper 001's static branch reads the crop);
- `afeat.npy`: float32 [n_mfcc + 2], MFCC, pitch and log short-time energy of the audio at the
  frame's time (paper 001), computed with torchaudio from the video's sound (zeros without sound);
- `words.npy`: float16 [Dw], with word embeddings: row i - 1 of `<words>/<video>.npy` is frame i's
  (the user computes them; no speech recogniser is shipped); zeros where there is none;
- one member per encoder the caller gives (`fer-dist extract`: the frozen backbone's `emb.npy` and
  the speech encoder's `voice.npy`), computed from the shard's samples by the caller's function.

The manifest is the source's plus `members`, `features` (what each feature is and its width) and
`feature_stats`, the per-dimension mean and std over the fold groups that training standardises
with. Shards are written under a temporary name and renamed; a rerun keeps the finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fer_dist.data.packing import audio
from fer_dist.data.packing.layout import Video
from fer_dist.data.packing.workers import completed
from fer_dist.data.packing.workers import pool as workers_pool
from fer_dist.data.shards import tars
from fer_dist.data.shards.format import (
    LABEL,
    MEMBERS,
    META,
    FeatureStats,
    Manifest,
    SampleMeta,
    atomic_write,
    claim,
    group_fold,
    npy_bytes,
    read_manifest,
)
from fer_dist.errors import InputError

# Each feature's dtype, in the order the twin shards hold the members (and the manifest names them).
DTYPES = {"embedding": np.float16, "audio_features": np.float32, "words": np.float16, "voice": np.float16}
Encoder = Callable[[list[dict]], np.ndarray]  # a shard's samples -> one feature per sample, [N, ...]


class ExtractError(InputError):
    """The source shards or dataset cannot give the features; the message says which and why."""


def prosody_job(job: tuple[Video, int, audio.ProsodyParams, Path]) -> None:
    """One video's audio features [frames, n_mfcc + 2], each frame at its own time (zeros past the
    video's end), cached in the work folder."""
    video, frames, params, work = job
    path = work / f"{video.name}.afeat.npy"
    if not path.exists():
        media = audio.read_media(video.media, params.sample_rate)
        features = np.zeros((frames, params.n_mfcc + 2), np.float32)
        times = audio.seconds(audio.frame_times(media, frames))
        features[: len(times)] = audio.prosody(media.audio, times, params)
        atomic_write(path, npy_bytes(features))


def word_tables(words: Path, manifest: Manifest) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Each video's word embeddings [frames, Dw], their width, and the videos that have none."""
    tables, missing = {}, []
    for name in manifest.videos:
        path = words / f"{name}.npy"
        if not path.exists():
            missing.append(name)
            continue
        table = np.load(path, allow_pickle=False)
        if table.ndim != 2:
            raise ExtractError(f"{path}: word embeddings must be [frames, dim], not {list(table.shape)}")
        tables[name] = table
    dims = {t.shape[1] for t in tables.values()}
    if not dims:
        raise ExtractError(f"{words}: no <video>.npy word embeddings for any video of the shards")
    if len(dims) != 1:
        raise ExtractError(f"{words}: the word embeddings have widths {sorted(dims)}; give one width for all videos")
    return tables, dims.pop(), missing


def word_row(table: np.ndarray | None, frame: int, dim: int) -> np.ndarray:
    if table is None or frame > len(table):
        return np.zeros(dim, np.float32)
    return table[frame - 1]


def write_shard(src: Path, dst: Path, encode: Callable[[list[dict]], dict[str, np.ndarray]]) -> dict[str, dict]:
    """`dst`, the twin of shard `src` with the features `encode` gives for its samples ([N, ...]
    each), written atomically; returns each feature's sum, sum of squares and count."""
    try:
        with open(src, "rb") as fh:
            samples = list(tars.samples(fh, str(src)))
    except (OSError, EOFError, ValueError) as exc:
        raise ExtractError(f"{src}: {exc}; repack the shards") from exc
    features = encode(samples)
    records = []
    for i, sample in enumerate(samples):
        members = {k: sample[k] for k in (MEMBERS["image"], LABEL, META)}
        for name, values in features.items():
            members[MEMBERS[name]] = npy_bytes(values[i].astype(DTYPES[name]))
        records.append(tars.tar_record(sample["__key__"], members))
    atomic_write(dst, b"".join(records) + tars.TAR_END)
    return {
        name: {
            "sum": values.sum(0, np.float64).tolist(),
            "sumsq": np.square(values, dtype=np.float64).sum(0).tolist(),
            "count": len(values),
        }
        for name, values in features.items()
    }


def statistics(parts: list[dict[str, dict]]) -> dict[str, FeatureStats]:
    """Per-dimension mean and std of each feature over `parts` (the fold groups' shards)."""
    stats = {}
    for name in parts[0]:
        count = sum(p[name]["count"] for p in parts)
        mean = sum(np.asarray(p[name]["sum"]) for p in parts) / count
        var = sum(np.asarray(p[name]["sumsq"]) for p in parts) / count - mean**2
        std = np.sqrt(np.maximum(var, 0))
        std = np.maximum(std, 0.1 * std.mean() + 1e-8)  # a near-constant dimension is not blown up into noise
        stats[name] = FeatureStats(mean.tolist(), std.tolist())
    return stats


def inputs_of(shards: Path, videos: list[Video], words: Path | None) -> tuple[Manifest, dict[str, Video], tuple]:
    """The source manifest, its videos found in `videos`, and the word tables (tables, width,
    videos without): everything that can refuse, checked before anything is written."""
    source = read_manifest(shards)
    by_name = {v.name: v for v in videos}
    unknown = sorted(set(source.videos) - set(by_name))
    if unknown:
        test = source.videos[unknown[0]].split == "test"
        hint = " (test videos: give --test-list, as to fer-dist shard)" if test else ""
        raise ExtractError(
            f"{len(unknown)} video(s) of the shards are not in the dataset given, e.g. {unknown[0]}{hint}"
        )
    return source, by_name, word_tables(words, source) if words else (None, 0, [])


def write_features(
    shards: Path,
    out: Path,
    videos: list[Video],
    encoders: dict[str, Encoder],
    described: dict[str, dict],
    stamp: dict,
    words: Path | None = None,
    params: audio.ProsodyParams | None = None,
    workers: int = 1,
    progress: Callable[[str, int], None] | None = None,
) -> Manifest:
    """The feature shards of `shards` in `out` (each encoder's feature, the audio features and,
    with `words`, the word embeddings) and their manifest, in which `described` says what each
    encoder's feature is (its `dim` is read from the data) and `stamp` what made them. A folder
    holding feature shards made otherwise is refused (`ExtractError`); a rerun keeps what is done."""
    shards, out, params = Path(shards), Path(out), params or audio.ProsodyParams()
    source, by_name, (tables, words_dim, wordless) = inputs_of(shards, videos, words)
    stamp = {
        **stamp,
        "source": str(shards.resolve()),
        "words": str(words) if words else None,
        "prosody": asdict(params),
    }
    done = claim(out, "extract_stamp", stamp, ExtractError, "feature shards")
    if done is not None:
        return done
    work = out / ".work"
    jobs = [(by_name[n], r.frames, params, work) for n, r in source.videos.items()]
    with workers_pool(workers, multiprocessing.get_context("forkserver")) as pool:  # see pack.worker_context
        for _ in completed(pool, prosody_job, jobs):
            if progress:
                progress("audio", 0)
    prosodies = {n: np.load(work / f"{n}.afeat.npy", allow_pickle=False) for n in source.videos}

    def encode(samples: list[dict]) -> dict[str, np.ndarray]:
        frames = [(m.video, m.frame) for m in (SampleMeta.from_bytes(s[META]) for s in samples)]
        features = {name: encoder(samples) for name, encoder in encoders.items()}
        features["audio_features"] = np.stack([prosodies[video][frame - 1] for video, frame in frames])
        if tables is not None:
            features["words"] = np.stack([word_row(tables.get(video), frame, words_dim) for video, frame in frames])
        return {name: features[name] for name in DTYPES if name in features}

    parts = {}
    for group, record in source.groups.items():
        for shard in record.shards:
            stats_path = work / f"{shard.name}.stats.json"
            dst = out / shard.name
            if dst.exists() and stats_path.exists():
                stats = json.loads(stats_path.read_text())
            else:
                stats = write_shard(shards / shard.name, dst, encode)
                atomic_write(stats_path, json.dumps(stats).encode())
            if group_fold(group) is not None:
                parts[shard.name] = stats
            if progress:
                progress(shard.name, shard.samples)
    first = next(iter(parts.values()))  # a feature's width: its last axis ([layers, D] for the voice)
    features = {name: {"dim": np.shape(first[name]["sum"])[-1], **info} for name, info in described.items()}
    features["audio_features"] = {
        "dim": params.n_mfcc + 2,
        "names": [f"mfcc{i}" for i in range(params.n_mfcc)] + ["pitch_hz", "log_energy"],
        "videos_without_audio": source.totals.videos_without_audio,  # their features are zeros
    }
    if words:
        features["words"] = {"dim": words_dim, "source": str(words), "videos_without": wordless}
    features = {name: features[name] for name in DTYPES if name in features}
    manifest = dataclasses.replace(
        source,
        members=["image", *features],
        features=features,
        feature_stats=statistics(list(parts.values())),
        extract_stamp=stamp,
    )
    manifest.write(out)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return manifest
