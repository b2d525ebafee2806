"""Small building blocks the sequence models share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fer_dist.models.contract import ExpressionModel


class RunScorer(ExpressionModel):
    """A sequence model with one head, `output`, that scores every frame of a clip-mode run (the run's
    track: expression logits, AU logits or valence-arousal)."""

    sequences = True
    heads = ("output",)
    output = "output"


def mlp(dims: list[int], outputs: int, dropout: float) -> nn.Sequential:
    """Linear + ReLU + dropout through `dims` (the first is the input width), then the classifier."""
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(dims[-1], outputs))


def sinusoid(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """[length, dim] fixed positional encoding of Attention Is All You Need."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def real_frames(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The run mask [B, L] (all True without one)."""
    return mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def neighbourhoods(x: torch.Tensor, keep: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's frames t-m .. t+m of its run: [B*L, 2m+1, D+1] and which are real [B*L, 2m+1].

    Positions outside the run or on its padding are zeros; the extra last channel is 1 on real
    frames, so that a recurrent encoder knows which inputs are missing."""
    flagged = torch.cat([x * keep[..., None], keep[..., None].to(x.dtype)], dim=-1)
    padded = F.pad(flagged, (0, 0, m, m))  # along the run
    windows = padded.unfold(1, 2 * m + 1, 1).transpose(-1, -2).flatten(0, 1)
    return windows, windows[..., -1] > 0
