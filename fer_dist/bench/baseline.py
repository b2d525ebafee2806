"""The loaders the training stream is measured against: a map-style folder-of-JPEGs loader as the
ABAW teams write them, and the limit, decoding the same JPEG bytes and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_dist.bench.common import timed_batches
from fer_dist.data.shards.format import Manifest, MelParams, fold_group, read_manifest


def teams_items(root: Path, manifest: Manifest, holdout: int, mel_dir: Path) -> list[tuple[str, str, int, int]]:
    """(crop path, video, frame, label) of the training frames with a crop; writes each training
    video's per-frame log-mel columns to `mel_dir/<video>.npy` once, as the teams precompute them."""
    from fer_dist.data.packing import audio
    from fer_dist.data.packing.layout import discover, list_crops, read_annotation

    mel_dir.mkdir(parents=True, exist_ok=True)
    params = MelParams()
    items = []
    for video in discover(root, prefer=manifest.prefer):
        record = manifest.videos.get(video.name)
        if record is None or record.fold in ("test", fold_group(holdout)):
            continue
        labels = read_annotation(video.annotation)
        npy = mel_dir / f"{video.name}.npy"
        if not npy.exists():
            media = audio.read_media(video.media, params.sample_rate)
            mel = audio.log_mel(media.audio, params) if media.audio is not None else None
            columns = audio.frame_columns(
                mel, audio.seconds(audio.frame_times(media, len(labels))), len(labels), params
            )
            np.save(npy, columns.astype(np.float16))
        for frame, path in sorted(list_crops(video.crops).items()):
            if frame <= len(labels) and labels[frame - 1] >= 0:
                items.append((str(path), video.name, frame, int(labels[frame - 1])))
    return items


def time_teams(root: str, shards: str, mel_dir: str, workers: int, samples: int, batch_size: int) -> dict:
    """A map-style loader in the style of the ABAW teams' code: a folder of JPEGs through PIL,
    resized and normalised to 224 x 224 on the CPU, the audio window sliced from per-video log-mel
    .npy files, and class-balanced sampling by a WeightedRandomSampler (square-root weights)."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

    items = teams_items(Path(root), read_manifest(Path(shards)), 0, Path(mel_dir))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    class Frames(Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int):
            path, video, frame, label = items[i]
            image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
            mel = np.load(Path(mel_dir) / f"{video}.npy", mmap_mode="r")[:, frame - 1 : frame + 63]
            return (x - mean) / std, torch.from_numpy(mel.astype(np.float32)), label

    labels = np.array([it[3] for it in items])
    counts = np.bincount(labels, minlength=8)
    weights = 1 / np.sqrt(counts[labels])
    sampler = WeightedRandomSampler(weights, samples, replacement=True, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(Frames(), batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    return timed_batches(loader, batch_size)


def time_decode(root: str, shards: str, mel_dir: str, workers: int, samples: int, batch_size: int) -> dict:
    """The limit: the same JPEG bytes, held in memory, decoded and batched, nothing else."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.io import ImageReadMode, decode_jpeg

    items = teams_items(Path(root), read_manifest(Path(shards)), 0, Path(mel_dir))
    blobs = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path, *_ in items]

    class Bytes(Dataset):
        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int):
            return decode_jpeg(blobs[i % len(blobs)], mode=ImageReadMode.RGB)

    init = (lambda _: torch.set_num_threads(1)) if workers else None
    loader = DataLoader(Bytes(), batch_size=batch_size, num_workers=workers, worker_init_fn=init, drop_last=True)
    return timed_batches(loader, batch_size)
