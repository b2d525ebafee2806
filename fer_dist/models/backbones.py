"""timm backbones as token-sequence encoders: [B, C, H, W] images in, [B, N, D] tokens out."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


def create_backbone(
    name: str, *, in_chans: int, img_size: int | tuple[int, int] | None, pretrained: bool | str, **kwargs
) -> nn.Module:
    """A timm model without its classifier. `img_size` is passed to models that take it (Swin, ViT).
    `pretrained`: True loads ImageNet weights from the hub; a path loads them from that local file
    (safetensors or a state dict, as timm reads them); timm adapts the first layer to `in_chans`."""
    if img_size is not None:
        kwargs["img_size"] = img_size
    if isinstance(pretrained, str):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained weights {pretrained} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
    return timm.create_model(name, pretrained=bool(pretrained), num_classes=0, in_chans=in_chans, **kwargs)


def tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map as a token sequence, whatever its layout."""
    f = backbone.forward_features(x)
    if f.ndim == 3:  # ViT-style [B, N, D]
        return f
    if getattr(backbone, "output_fmt", "NCHW") == "NHWC":  # Swin
        return f.flatten(1, 2)
    return f.flatten(2).transpose(1, 2)
