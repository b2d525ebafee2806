"""timm backbones as token-sequence encoders: [B, C, H, W] images in, [B, N, D] tokens out."""

from __future__ import annotations

import timm
import torch
from torch import nn


def create_backbone(
    name: str, *, in_chans: int, img_size: int | tuple[int, int] | None, pretrained: bool, **kwargs
) -> nn.Module:
    """A timm model without its classifier. `img_size` is passed to models that take it (Swin, ViT);
    `pretrained` loads ImageNet weights from the hub, or from a local file given as
    `pretrained_cfg_overlay={"file": "/path/model.safetensors"}`."""
    if img_size is not None:
        kwargs["img_size"] = img_size
    return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)


def tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map as a token sequence, whatever its layout."""
    f = backbone.forward_features(x)
    if f.ndim == 3:  # ViT-style [B, N, D]
        return f
    if getattr(backbone, "output_fmt", "NCHW") == "NHWC":  # Swin
        return f.flatten(1, 2)
    return f.flatten(2).transpose(1, 2)
