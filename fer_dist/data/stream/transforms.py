"""Batched, on-device preparation of decoded batches: the CPU workers only decode (and with
`data.decode: gpu` not even that: the crops' JPEG bytes are decoded here, in one call per batch).

Crops are resized to the model's size; in training each one then goes through one random affine
warp (random resized crop, small rotation, horizontal flip) and a colour jitter, all as batched
tensor operations. Each sample's audio window is cut from the stored widest window and resized to
the audio input in one `grid_sample` call. Clip-mode batches ([B, L, ...]) are flattened to frames
and every frame of a run gets its run's augmentation. `mix` then blends pairs of samples (mixup,
or Remix, which moves the label towards the minority class).

Modality dropout (`audio_dropout`): in training, a share of the samples (whole runs in clip mode)
hear silence, the log-mel a video without an audio stream is packed with, so that a fusion model
learns to fall back on the face when a video has no sound instead of meeting silence first at test
time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from fer_dist.config import DataConfig
from fer_dist.data.shards.format import Manifest
from fer_dist.data.shards.windows import PCM_SCALE, SILENCE

GRAY = (0.299, 0.587, 0.114)


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


def uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def per_run(values: torch.Tensor, length: int) -> torch.Tensor:
    return values.repeat_interleave(length, dim=0)


def random_affine(n: int, cfg: DataConfig, device: torch.device) -> torch.Tensor:
    """[n, 2, 3] maps from output to input coordinates: random resized crop, rotation, flip."""
    area = uniform(n, *cfg.crop_scale, device)
    low = area.log().clamp(min=math.log(3 / 4))  # aspect ratios in [3/4, 4/3] that fit the crop inside
    high = (-area.log()).clamp(max=math.log(4 / 3))
    log_ratio = low + (high - low) * torch.rand(n, device=device)
    width, height = torch.sqrt(area * log_ratio.exp()), torch.sqrt(area / log_ratio.exp())
    angle = uniform(n, -cfg.rotation, cfg.rotation, device) * math.pi / 180
    flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=device)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * cos * flip
    theta[:, 0, 1] = -width * sin
    theta[:, 1, 0] = height * sin * flip
    theta[:, 1, 1] = height * cos
    theta[:, 0, 2] = uniform(n, -1, 1, device) * (1 - width)
    theta[:, 1, 2] = uniform(n, -1, 1, device) * (1 - height)
    return theta


def color_jitter(image: torch.Tensor, strength: float, length: int = 1) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled by a factor in 1 +- strength, one factor
    per run of `length` frames; image in [0, 1]."""
    runs = image.shape[0] // length

    def factor() -> torch.Tensor:
        return per_run(uniform(runs, 1 - strength, 1 + strength, image.device), length)[:, None, None, None]

    gray = (image * torch.tensor(GRAY, device=image.device)[:, None, None]).sum(1, keepdim=True)
    image = image * factor()
    image = (image - gray.mean((2, 3), keepdim=True)) * factor() + gray.mean((2, 3), keepdim=True)
    image = (image - gray) * factor() + gray
    return image.clamp_(0, 1)


def prepare(
    batch: dict,
    device: torch.device,
    cfg: DataConfig,
    manifest: Manifest,
    train: bool,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]],
) -> dict:
    """The model inputs the batch holds, on `device`, leading dims kept: `image` [..., 3, S, S]
    standardised with `normalisation` (the model's), `audio` [..., 1, H, W], `wave` [..., T] in
    [-1, 1] with `wave_lengths` [...] (the window's samples at the start, silence after), and
    per-frame feature vectors standardised with the shards' statistics."""
    lead = batch["label"].shape
    inputs = {}
    if "jpeg" in batch:
        jpegs = list(batch["jpeg"].split(batch["jpeg_lengths"].tolist()))
        try:
            images = decode_on(jpegs, device, cfg.image_size)
        except RuntimeError as exc:  # whole but corrupt inside: packing validated it, so the shard is damaged
            raise RuntimeError(f"a crop of the batch with keys {batch['key']} does not decode: {exc}") from exc
        batch = {**batch, "image": images.unflatten(0, lead)}
    if "image" in batch:
        inputs["image"] = prepare_image(batch["image"], device, cfg, train, normalisation).unflatten(0, lead)
    silent = None  # audio dropout: the runs that hear silence, in whatever form the audio comes
    if train and cfg.audio_dropout and ("mel" in batch or "wave" in batch):
        silent = per_run(torch.rand(lead[0], device=device) < cfg.audio_dropout, math.prod(lead[1:]))
    if "mel" in batch:
        stats = manifest.mel_stats
        mel = batch["mel"].to(device, non_blocking=True).flatten(0, len(lead) - 1).float()
        if silent is not None:
            mel = torch.where(silent[:, None, None], SILENCE, mel)
        mel = (mel - stats.mean) / stats.std
        window = batch["window"].to(device).flatten(0, len(lead) - 1)
        inputs["audio"] = crop_resize_windows(mel, window, tuple(cfg.audio_size)).unflatten(0, lead)
    if "wave" in batch:
        wave = batch["wave"].to(device, non_blocking=True).flatten(0, len(lead) - 1).float() / PCM_SCALE
        if silent is not None:
            wave = torch.where(silent[:, None], 0.0, wave)
        inputs["wave"] = wave.unflatten(0, lead)
        inputs["wave_lengths"] = batch["wave_length"].to(device)
    for name, stats in manifest.feature_stats.items():
        if name in batch:
            mean, std = torch.tensor(stats.mean, device=device), torch.tensor(stats.std, device=device)
            inputs[name] = (batch[name].to(device, non_blocking=True).float() - mean) / std
    return inputs


def one_size(images: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """uint8 crops [3, H, W] of one batch, brought to one size so that they stack: unchanged when
    they share one; else each resized (bilinear, antialiased; a non-square crop stretched, as the
    square model input stretches it anyway) to `size` x `size` px, the model's input size, so that
    a crop is interpolated once, from its original pixels."""
    if len({tuple(i.shape) for i in images}) == 1:
        return images
    return [
        F.interpolate(i[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for i in images
    ]


def decode_on(jpegs: list[torch.Tensor], device: torch.device, size: int) -> torch.Tensor:
    """A batch's JPEG bytes decoded in one call on `device` (nvJPEG on a GPU) to uint8 [N, 3, H, W];
    crops of differing sizes are brought to `size` (`one_size`), as the loader workers do."""
    return torch.stack(one_size(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device), size))


def prepare_image(
    images: torch.Tensor,
    device: torch.device,
    cfg: DataConfig,
    train: bool,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]],
) -> torch.Tensor:
    """uint8 crops [..., 3, H, W] to float frames [N, 3, S, S] standardised with (mean, std); in
    training, one random affine warp and colour jitter per run (per frame outside clip mode)."""
    lead = images.shape[:-3]
    runs, length = lead[0], math.prod(lead[1:])
    image = images.to(device, non_blocking=True).flatten(0, len(lead) - 1)
    image = image.to(torch.float32, memory_format=torch.contiguous_format).div_(255)  # crops come channels-last
    if image.shape[-1] != cfg.image_size or image.shape[-2] != cfg.image_size:
        image = F.interpolate(image, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    if train:
        theta = per_run(random_affine(runs, cfg, device), length)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if cfg.color_jitter:
            image = color_jitter(image, cfg.color_jitter, length)
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in normalisation)
    return (image - mean) / std


def remix_label_weight(
    lam: torch.Tensor, n_i: torch.Tensor, n_j: torch.Tensor, kappa: float, tau: float
) -> torch.Tensor:
    """lambda_y of Remix (Chou et al. 2020, as used by paper 001): the mixed label's share of y_i.

    The label goes wholly to the minority sample when the majority one is >= kappa times as
    frequent and the minority sample's share of the mix is above 1 - tau."""
    ratio = n_i / n_j
    lam_y = torch.where((ratio >= kappa) & (lam < tau), torch.zeros_like(lam), lam)
    return torch.where((ratio <= 1 / kappa) & (1 - lam < tau), torch.ones_like(lam), lam_y)


def mix(
    inputs: dict, labels: torch.Tensor, cfg: DataConfig, class_counts: torch.Tensor, num_classes: int
) -> tuple[dict, torch.Tensor]:
    """Mixup or Remix over the batch: inputs blended with a shuffled copy, soft targets [..., C]."""
    b = labels.shape[0]
    lam = torch.distributions.Beta(cfg.mix_alpha, cfg.mix_alpha).sample((b,)).to(labels.device)
    perm = torch.randperm(b, device=labels.device)
    y_i, y_j = labels, labels[perm]
    lam_x = lam.view(b, *[1] * (labels.dim() - 1))
    lam_y = lam_x.expand_as(labels).clone()
    if cfg.mix == "remix":
        counts = class_counts.to(labels.device).float()
        n_i, n_j = counts[y_i.clamp(min=0)], counts[y_j.clamp(min=0)]
        lam_y = remix_label_weight(lam_y, n_i, n_j, cfg.remix_kappa, cfg.remix_tau)
    lam_y = torch.where(y_j < 0, torch.ones_like(lam_y), lam_y)  # a clip's padding lends no label
    one_hot_i = F.one_hot(y_i.clamp(min=0), num_classes).float()
    one_hot_j = F.one_hot(y_j.clamp(min=0), num_classes).float()
    target = lam_y[..., None] * one_hot_i + (1 - lam_y[..., None]) * one_hot_j
    mixed = {}
    for name, x in inputs.items():
        if not x.is_floating_point():  # wave_lengths: a blend of two windows lasts as long as the longer
            mixed[name] = torch.maximum(x, x[perm])
            continue
        w = lam.view(b, *[1] * (x.dim() - 1))
        mixed[name] = w * x + (1 - w) * x[perm]
    return mixed, target
