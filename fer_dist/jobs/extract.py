"""Feature shards: frozen encoders run once over packed shards, for the models of papers 001 and
004 and the recipe's `face_voice_temporal_features`.

    fer-dist extract --shards shards/affwild2 --root /data/affwild2 --out shards/affwild2-feat \
        --backbone resnet50 --weights expression.safetensors [--words words/] \
        [--speech-encoder wavlm_base --speech-weights weights/wavlm_base.pt --speech-window l]

Every shard gets a twin of the same name with the same keys in the same order (clips stay clips):

- `jpg`, `cls`, `json` copied byte for byte (paper 001's static branch reads the crop);
- `emb.npy`: float16 [D], the frozen backbone's pooled feature of the crop (an expression embedding
  when the weights are an expression model's);
- `voice.npy`: float16 [layers, D'], with `--speech-encoder`: each transformer layer of the frozen
  speech encoder (`models/speech.py`) averaged over the frame's `--speech-window` of its waveform
  member (source shards packed with `--audio-wave`); the model learns the sum over layers;
- `afeat.npy`: float32 [n_mfcc + 2], MFCC, pitch and log short-time energy of the audio at the
  frame's time (paper 001), computed with torchaudio from the video's sound (zeros without sound);
- `words.npy`: float16 [Dw], with `--words DIR`: row i - 1 of DIR/<video>.npy is frame i's word
  embedding, which the user computes (no speech recogniser is shipped); zeros where there is none.

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
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fer_dist.config import DataConfig
from fer_dist.console import console
from fer_dist.data import audio, tars
from fer_dist.data.format import (
    LABEL,
    MEMBERS,
    META,
    FeatureStats,
    Manifest,
    atomic_write,
    claim,
    load_npy,
    npy_bytes,
    read_manifest,
)
from fer_dist.data.layout import Video
from fer_dist.data.transforms import one_size, prepare_image
from fer_dist.data.windows import NAMES, wave_span
from fer_dist.models.backbones import create_backbone
from fer_dist.models.contract import normalisation_of
from fer_dist.models.speech import SpeechEncoder

DTYPES = {"embedding": np.float16, "audio_features": np.float32, "words": np.float16, "voice": np.float16}


class ExtractError(ValueError):
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


def row(table: np.ndarray | None, frame: int, dim: int) -> np.ndarray:
    if table is None or frame > len(table):
        return np.zeros(dim, np.float32)
    return table[frame - 1]


@torch.no_grad()
def embed(model: torch.nn.Module, crops: list[bytes], size: int, batch: int, device: torch.device) -> np.ndarray:
    out = []
    cfg, normalisation = DataConfig(image_size=size), normalisation_of(model)
    for i in range(0, len(crops), batch):
        chunk = [torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in crops[i : i + batch]]
        decoded = [decode_jpeg(c, mode=ImageReadMode.RGB) for c in chunk]
        images = torch.stack(one_size(decoded, size))
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(model(prepare_image(images, device, cfg, False, normalisation)).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def hear(encoder: SpeechEncoder, waves: list[bytes], window: str, batch: int, device: torch.device) -> np.ndarray:
    """[N, layers, D]: the encoder's layers averaged over each frame's `window` of its waveform."""
    start, length = wave_span(window)
    stored = np.stack([load_npy(w)[start : start + length] for w in waves])
    out = []
    for i in range(0, len(stored), batch):
        wave = torch.from_numpy(stored[i : i + batch]).to(device).float() / audio.PCM_SCALE
        lengths = torch.full((len(wave),), length, device=device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(encoder.layer_means(wave, lengths).float().cpu().numpy())
    return np.concatenate(out)


def extract_shard(
    src: Path,
    dst: Path,
    model,
    size: int,
    batch: int,
    device,
    prosodies: dict,
    words: dict | None,
    words_dim: int,
    voice: tuple[SpeechEncoder, str] | None = None,
) -> dict[str, dict]:
    """Writes `dst` from `src` (atomically); returns each feature's sum, sum of squares and count."""
    try:
        with open(src, "rb") as fh:
            samples = list(tars.samples(fh, str(src)))
    except (OSError, EOFError, ValueError) as exc:
        raise ExtractError(f"{src}: {exc}; repack the shards") from exc
    try:
        features = {"embedding": embed(model, [s[MEMBERS["image"]] for s in samples], size, batch, device)}
    except RuntimeError as exc:
        raise ExtractError(f"{src}: a crop does not decode ({exc}); repack the shards") from exc
    frames = [(m["video"], m["frame"]) for m in (json.loads(s[META]) for s in samples)]
    features["audio_features"] = np.stack([prosodies[video][frame - 1] for video, frame in frames])
    if words is not None:
        features["words"] = np.stack([row(words.get(video), frame, words_dim) for video, frame in frames])
    if voice is not None:
        features["voice"] = hear(voice[0], [s[MEMBERS["wave"]] for s in samples], voice[1], batch, device)
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


def extract(
    shards: Path,
    out: Path,
    videos: list[Video],
    backbone: str,
    weights: str | None = None,
    image_size: int = 112,
    words: Path | None = None,
    batch_size: int = 128,
    workers: int = 1,
    params: audio.ProsodyParams | None = None,
    progress: Callable[[str, int], None] | None = None,
    speech_encoder: str | None = None,
    speech_weights: str | None = None,
    speech_window: str = "l",
) -> Manifest:
    """Writes the feature shards of `shards` to `out` and returns their manifest."""
    shards, out, params = Path(shards), Path(out), params or audio.ProsodyParams()
    source = read_manifest(shards)
    if speech_encoder and "wave" not in source.members:
        raise ExtractError(
            f"{shards} hold no waveforms for the speech encoder; pack them with `fer-dist shard --audio-wave`"
        )
    if speech_window not in NAMES:
        raise ExtractError(f"the speech window is one of {', '.join(NAMES)}, not {speech_window!r}")
    stamp = {
        "source": str(shards.resolve()),
        "backbone": backbone,
        "weights": weights,
        "image_size": image_size,
        "words": str(words) if words else None,
        "prosody": asdict(params),
    }
    if speech_encoder:
        stamp["speech"] = {"encoder": speech_encoder, "weights": speech_weights, "window": speech_window}
    # Everything that can refuse is checked before the first file is written.
    by_name = {v.name: v for v in videos}
    unknown = sorted(set(source.videos) - set(by_name))
    if unknown:
        raise ExtractError(f"{len(unknown)} video(s) of the shards are not in the dataset given, e.g. {unknown[0]}")
    tables, words_dim, wordless = word_tables(words, source) if words else (None, 0, [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # without --weights the backbone is a fixed random projection, the same on a resume
    model = create_backbone(backbone, in_chans=3, img_size=None, pretrained=weights or False).eval().to(device)
    model.requires_grad_(False)
    voice = None
    if speech_encoder:
        torch.manual_seed(0)  # as the backbone: without weights, the same random encoder every time
        voice = (SpeechEncoder(speech_encoder, speech_weights).eval().to(device), speech_window)

    done = claim(out, "extract_stamp", stamp, ExtractError, "feature shards")
    if done is not None:
        return done
    work = out / ".work"
    jobs = [(by_name[n], r.frames, params, work) for n, r in source.videos.items()]
    with multiprocessing.get_context("forkserver").Pool(max(1, workers)) as pool:  # see shard.pack
        for _ in pool.imap_unordered(prosody_job, jobs):
            if progress:
                progress("audio", 0)
    prosodies = {n: np.load(work / f"{n}.afeat.npy", allow_pickle=False) for n in source.videos}
    parts = {}
    for group, record in source.groups.items():
        for shard in record.shards:
            stats_path = work / f"{shard.name}.stats.json"
            dst = out / shard.name
            if dst.exists() and stats_path.exists():
                stats = json.loads(stats_path.read_text())
            else:
                stats = extract_shard(
                    shards / shard.name, dst, model, image_size, batch_size, device, prosodies, tables, words_dim, voice
                )
                atomic_write(stats_path, json.dumps(stats).encode())
            if group.startswith("fold"):
                parts[shard.name] = stats
            if progress:
                progress(shard.name, shard.samples)
    embedding_dim = len(next(iter(parts.values()))["embedding"]["sum"])
    features = {
        "embedding": {
            "dim": embedding_dim,
            "backbone": backbone,
            "weights": weights,
            "image_size": image_size,
        },
        "audio_features": {
            "dim": params.n_mfcc + 2,
            "names": [f"mfcc{i}" for i in range(params.n_mfcc)] + ["pitch_hz", "log_energy"],
            "videos_without_audio": source.totals.videos_without_audio,  # their features are zeros
        },
    }
    if words:
        features["words"] = {"dim": words_dim, "source": str(words), "videos_without": wordless}
    if voice:
        features["voice"] = {
            "dim": voice[0].dim,
            "layers": len(voice[0].layer_weights),
            "encoder": speech_encoder,
            "weights": speech_weights,
            "window": speech_window,
            "samples": wave_span(speech_window)[1],
        }
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


def show(manifest: Manifest, out: Path) -> None:
    features = manifest.features
    shapes = {name: ", ".join(str(f[k]) for k in ("layers", "dim") if k in f) for name, f in features.items()}
    console.print(f"{manifest.totals.samples} samples in {out}: " + ", ".join(f"{n} [{d}]" for n, d in shapes.items()))
    silent = features["audio_features"]["videos_without_audio"]
    if silent:
        console.print(f"[yellow]{len(silent)} video(s) without audio have zero audio features:[/] {', '.join(silent)}")
    missing = features.get("words", {}).get("videos_without")
    if missing:
        console.print(f"[yellow]{len(missing)} video(s) without word embeddings have zeros:[/] {', '.join(missing)}")
