"""timm backbones as token-sequence encoders: [B, C, H, W] images in, [B, N, D] tokens out.

Any timm model serves: a vision transformer's tokens are used as they are, a CNN's last feature
map becomes one token per position. Models with a fixed input size (Swin, ViT) are told the size;
CNNs take any size and are not.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from fer_dist.config import ConfigError


def create_backbone(
    name: str, *, in_chans: int, img_size: int | tuple[int, int] | None, pretrained: bool | str, **kwargs
) -> nn.Module:
    """A timm model without its classifier; given `img_size`, checked with one forward pass of it.
    `pretrained`: True loads ImageNet weights from the hub; a path loads them from that local file
    (safetensors or a state dict, as timm reads them); timm adapts the first layer to `in_chans`.
    A name timm does not know, or a model that cannot take these inputs, is a ConfigError."""
    if not timm.is_model(name):
        raise ConfigError(f"backbone {name!r} is not a timm model (timm.list_models() names them)")
    if isinstance(pretrained, str):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained weights {pretrained} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}

    def build(**sized) -> nn.Module:
        return timm.create_model(name, pretrained=bool(pretrained), num_classes=0, in_chans=in_chans, **kwargs, **sized)

    try:
        try:
            model = build(img_size=img_size) if img_size is not None else build()
        except TypeError as exc:  # a CNN: it takes any input size
            if img_size is None or "img_size" not in str(exc):
                raise
            model = build()
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            with torch.no_grad():
                model.eval()
                tokens(model, torch.zeros(1, in_chans, *size))
                model.train()
    except (TypeError, ValueError, IndexError, KeyError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"backbone {name!r} cannot be built for {in_chans}-channel inputs of size {img_size}: {exc}"
        ) from exc
    return model


def tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map as a token sequence, whatever its layout."""
    f = backbone.forward_features(x)
    if f.ndim == 3:  # ViT-style [B, N, D]
        return f
    if getattr(backbone, "output_fmt", "NCHW") == "NHWC":  # Swin
        return f.flatten(1, 2)
    return f.flatten(2).transpose(1, 2)
