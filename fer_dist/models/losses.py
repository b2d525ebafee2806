"""Losses over a model's named heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_head_ce(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, heads: tuple[str, ...], label_smoothing: float = 0.0
) -> torch.Tensor:
    """Sum of the heads' cross-entropies: every head learns from every sample."""
    return sum(F.cross_entropy(outputs[h].float(), target, label_smoothing=label_smoothing) for h in heads)
