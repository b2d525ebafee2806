"""The training objectives, over a model's named heads.

Every loss reads soft targets [N, C]: class indices become one-hot, mixup and Remix already give
probabilities. Clip-mode runs are flattened to their real frames with the run mask first.

    ce      -sum_c w_c q_c log p_c, q the (label-smoothed) target, w the class weights;
            normalised by sum_i sum_c w_c q_ic, as torch's weighted cross-entropy is
    focal   -sum_c alpha q_c (1 - p_c)^gamma log p_c (Lin et al.; paper 003: alpha 0.9, gamma 2)
    R-Drop  (L(p1) + L(p2)) / 2 + alpha (KL(p1 || p2) + KL(p2 || p1)) / 2 over two forward passes
            with different dropout (paper 004, Eq. 4: alpha 5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fer_dist.config import LossConfig


def soft_targets(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    q = target.float() if target.is_floating_point() else F.one_hot(target, num_classes).float()
    return q * (1 - smoothing) + smoothing / num_classes


def frames(x: torch.Tensor, mask: torch.Tensor | None, soft: bool) -> torch.Tensor:
    """[N, ...] over the real frames: `mask` selects them from [B, L, ...] runs."""
    if mask is not None:
        return x[mask]
    return x.flatten(0, x.dim() - 2) if soft else x.flatten()


def cross_entropy(logits: torch.Tensor, q: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    w = q if weights is None else q * weights
    return -(w * logits.float().log_softmax(-1)).sum() / w.sum().clamp_min(1e-12)


def focal(logits: torch.Tensor, q: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    return -(alpha * q * (1 - logp.exp()).pow(gamma) * logp).sum(-1).mean()


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2, summed over classes, averaged over frames."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    return 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1)).mean()


def objective(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    heads: tuple[str, ...],
    cfg: LossConfig,
    mask: torch.Tensor | None = None,
    again: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The configured loss summed over `heads`, each weighted by `cfg.head_weights` (1 when not
    named); `again` is the second pass of R-Drop."""
    num_classes = outputs[heads[0]].shape[-1]
    soft = target.is_floating_point()
    q = soft_targets(frames(target, mask, soft), num_classes, cfg.label_smoothing)
    weights = torch.tensor(cfg.class_weights, device=q.device) if cfg.class_weights else None

    def loss(logits: torch.Tensor) -> torch.Tensor:
        if cfg.name == "focal":
            return focal(logits, q, cfg.focal_alpha, cfg.focal_gamma)
        return cross_entropy(logits, q, weights)

    total = torch.zeros((), device=target.device)
    for h in heads:
        first = frames(outputs[h], mask, True)
        if again is None:
            term = loss(first)
        else:
            second = frames(again[h], mask, True)
            term = 0.5 * (loss(first) + loss(second)) + cfg.rdrop_alpha * symmetric_kl(first, second)
        total = total + cfg.head_weights.get(h, 1.0) * term
    return total
