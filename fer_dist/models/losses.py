"""Losses over a model's named heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_head_ce(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    heads: tuple[str, ...],
    mask: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum of the heads' cross-entropies: every head learns from every sample.

    `target` is class indices [N, ...] or class probabilities [N, ..., C] (mixup); `mask` keeps
    the real frames of padded clip-mode runs."""
    soft = target.is_floating_point()
    if mask is not None:
        target = target[mask]
    total = 0.0
    for h in heads:
        logits = outputs[h].float()
        logits = logits[mask] if mask is not None else logits.flatten(0, logits.dim() - 2)
        flat = target.flatten(0, target.dim() - 2) if soft else target.flatten()
        total = total + F.cross_entropy(logits, flat, label_smoothing=label_smoothing)
    return total
