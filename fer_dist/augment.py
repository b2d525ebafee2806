"""Batched, on-device preparation of decoded batches: the CPU workers only decode.

Crops are resized to the model's size, flipped and normalised; each sample's audio window is
cut from the stored widest window and resized to the audio input in one `grid_sample` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fer_dist.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_resize_windows(mel: torch.Tensor, window: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, n_mels, W] with per-sample (start, width) column windows -> [B, 1, *size]."""
    b, _, total = mel.shape
    start, width = window[:, 0].to(mel.dtype), window[:, 1].to(mel.dtype)
    theta = torch.zeros(b, 2, 3, device=mel.device, dtype=mel.dtype)
    theta[:, 0, 0] = width / total
    theta[:, 0, 2] = (2 * start + width) / total - 1
    theta[:, 1, 1] = 1
    grid = F.affine_grid(theta, [b, 1, *size], align_corners=False)
    return F.grid_sample(mel.unsqueeze(1), grid, mode="bilinear", align_corners=False)


def prepare(batch: dict, device: torch.device, cfg: DataConfig, mel_stats: dict, train: bool) -> dict:
    """Model inputs `image` [B, 3, S, S] and `audio` [B, 1, H, W] on `device`."""
    image = batch["image"].to(device, non_blocking=True).float().div_(255)
    if image.shape[-1] != cfg.image_size or image.shape[-2] != cfg.image_size:
        image = F.interpolate(image, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    if train and cfg.hflip:
        flip = torch.rand(image.shape[0], device=device) < 0.5
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    image = (image - mean) / std
    mel = (batch["mel"].to(device, non_blocking=True).float() - mel_stats["mean"]) / mel_stats["std"]
    audio = crop_resize_windows(mel, batch["window"].to(device), tuple(cfg.audio_size))
    return {"image": image, "audio": audio}
