"""`fer-dist extract`: frozen encoders run once over packed shards, into feature shards
(`data/packing/features.py`), for the models of papers 001 and 004 and the recipe's
`face_voice_temporal_features`.

    fer-dist extract --shards shards/affwild2 --root /data/affwild2 --out shards/affwild2-feat \
        --backbone resnet50 --weights expression.safetensors [--words words/] \
        [--speech-encoder wavlm_base --speech-weights weights/wavlm_base.pt --speech-window l]

Beside the audio features and word embeddings the feature shards always hold:

- `emb.npy`: float16 [D], the frozen backbone's pooled feature of the crop (an expression embedding
  when the weights are an expression model's);
- `voice.npy`: float16 [layers, D'], with `--speech-encoder`: each transformer layer of the frozen
  speech encoder (`models/speech.py`) averaged over the frame's `--speech-window` of its waveform
  member (source shards packed with `--audio-wave`); the model learns the sum over layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fer_dist.config import DataConfig
from fer_dist.console import console
from fer_dist.data.packing import audio
from fer_dist.data.packing.features import ExtractError, inputs_of, write_features
from fer_dist.data.packing.layout import LayoutError, Video, discover
from fer_dist.data.shards.format import MEMBERS, Manifest, load_npy, read_manifest
from fer_dist.data.shards.windows import NAMES, PCM_SCALE, wave_span
from fer_dist.data.stream.transforms import one_size, prepare_image
from fer_dist.engine.distributed import keep_freed_memory
from fer_dist.models.backbones import create_backbone
from fer_dist.models.contract import normalisation_of
from fer_dist.models.speech import SpeechEncoder


def dataset_videos(
    source: Manifest,
    shards: Path,
    root: Path,
    video_dirs: list[Path] | None = None,
    test_list: Path | None = None,
    prefer: list[str] | None = None,
) -> list[Video]:
    """The videos of the dataset under `root` that the shards `source` (read from `shards`) were
    packed from (`layout.discover`), a name in several folders taken from the `prefer` folders or,
    without them, from those the packing was given (`Manifest.prefer`). Raises LayoutError as
    `discover` does, naming the packing's folders when they were the ones taken, and when `prefer`
    takes another file for a video than the packing took (its features would not be its frames')."""
    if not source.prefer:
        return discover(root, video_dirs=video_dirs, test_list=test_list, prefer=prefer)
    try:
        packed = discover(root, video_dirs=video_dirs, test_list=test_list, prefer=source.prefer)
    except LayoutError as exc:
        raise LayoutError(
            f"{exc} (with the --prefer {' '.join(source.prefer)} that {shards} were packed with; give --prefer to "
            "choose otherwise)"
        ) from None
    if not prefer:
        return packed
    chosen = discover(root, video_dirs=video_dirs, test_list=test_list, prefer=prefer)
    was = {v.name: v.media for v in packed}
    other = next((v for v in chosen if v.name in was and v.media != was[v.name]), None)
    if other is not None:
        raise LayoutError(
            f"--prefer {' '.join(prefer)} takes {other.media} for {other.name}, but {shards} were packed from "
            f"{was[other.name]} (--prefer {' '.join(source.prefer)}): features must come from the files packed; drop "
            "--prefer, or pack again with it"
        )
    return chosen


@torch.no_grad()
def embed(model: torch.nn.Module, crops: list[bytes], size: int, batch: int, device: torch.device) -> np.ndarray:
    """[N, D]: the frozen backbone's pooled feature of each crop, resized to `size` px."""
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
        wave = torch.from_numpy(stored[i : i + batch]).to(device).float() / PCM_SCALE
        lengths = torch.full((len(wave),), length, device=device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(encoder.layer_means(wave, lengths).float().cpu().numpy())
    return np.concatenate(out)


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
    """Writes the feature shards of `shards` to `out` and returns their manifest. Everything that
    can refuse (the shards, the videos, the word embeddings, the encoders) is checked before the
    first file is written; raises `ExtractError` naming what and why."""
    shards, params = Path(shards), params or audio.ProsodyParams()
    source = read_manifest(shards)
    if speech_encoder and "wave" not in source.members:
        raise ExtractError(
            f"{shards} hold no waveforms for the speech encoder; pack them with `fer-dist shard --audio-wave`"
        )
    if speech_window not in NAMES:
        raise ExtractError(f"the speech window is one of {', '.join(NAMES)}, not {speech_window!r}")
    inputs_of(shards, videos, words)
    keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # without --weights the backbone is a fixed random projection, the same on a resume
    model = create_backbone(backbone, in_chans=3, img_size=None, pretrained=weights or False).eval().to(device)
    model.requires_grad_(False)

    def crops(samples: list[dict]) -> np.ndarray:
        try:
            return embed(model, [s[MEMBERS["image"]] for s in samples], image_size, batch_size, device)
        except RuntimeError as exc:
            raise ExtractError(f"{samples[0]['__url__']}: a crop does not decode ({exc}); repack the shards") from exc

    encoders = {"embedding": crops}
    described = {"embedding": {"backbone": backbone, "weights": weights, "image_size": image_size}}
    stamp = {"backbone": backbone, "weights": weights, "image_size": image_size}
    if speech_encoder:
        torch.manual_seed(0)  # as the backbone: without weights, the same random encoder every time
        speech = SpeechEncoder(speech_encoder, speech_weights).eval().to(device)
        encoders["voice"] = lambda samples: hear(
            speech, [s[MEMBERS["wave"]] for s in samples], speech_window, batch_size, device
        )
        described["voice"] = {
            "layers": len(speech.layer_weights),
            "encoder": speech_encoder,
            "weights": speech_weights,
            "window": speech_window,
            "samples": wave_span(speech_window)[1],
        }
        stamp["speech"] = {"encoder": speech_encoder, "weights": speech_weights, "window": speech_window}
    return write_features(shards, out, videos, encoders, described, stamp, words, params, workers, progress)


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
