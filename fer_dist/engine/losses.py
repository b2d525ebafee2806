"""The training objectives, over a model's named heads.

Every loss reads soft targets [N, C]: class indices become one-hot, mixup and Remix already give
probabilities. Clip-mode runs are flattened to their real frames with the run mask first.

    ce      -sum_c w_c q_c log p_c, q the (label-smoothed) target, w the class weights;
            normalised by sum_i sum_c w_c q_ic, as torch's weighted cross-entropy is
    focal   -sum_c alpha q_c (1 - p_c)^gamma log p_c (Lin et al.; paper 003: alpha 0.9, gamma 2)
    R-Drop  (L(p1) + L(p2)) / 2 + alpha (KL(p1 || p2) + KL(p2 || p1)) / 2 over two forward passes
            with different dropout (paper 004, Eq. 4: alpha 5)

Action units (12 logits a head): binary cross-entropy with positive weights, plus paper 001's circle
loss; valence-arousal (2 values a head, through tanh): 1 - CCC per dimension over the batch. Each
track's loss reads its columns of a head's output and only the frames labelled for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fer_dist.config import LossConfig
from fer_dist.tracks import TRACKS, layout


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


def action_units(
    logits: torch.Tensor, y: torch.Tensor, cfg: LossConfig, pos_weight: torch.Tensor | None
) -> torch.Tensor:
    """Binary cross-entropy over [N, 12] AU `logits` and 0/1 (or mixed) targets `y`, averaged over
    frames and AUs (paper 001, Eq. 4), each AU's positives weighed by `pos_weight` [12]; plus
    `cfg.au_circle` times the circle loss (`circle`)."""
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
    if cfg.au_circle:
        loss = loss + cfg.au_circle * circle(logits, y)
    return loss


def circle(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Paper 001's multi-label circle loss (Eq. 5) over [N, K] raw `logits` s and 0/1 targets y:
    log(1 + sum_{y_i = 0} e^{s_i}) + log(1 + sum_{y_j = 1} e^{-s_j}), averaged over frames. It
    pushes every positive's logit above 0 and every negative's below."""
    zero = torch.zeros_like(logits[:, :1])
    off = torch.where(y < 0.5, logits, torch.full_like(logits, -torch.inf))
    on = torch.where(y >= 0.5, -logits, torch.full_like(logits, -torch.inf))
    return (torch.logsumexp(torch.cat([zero, off], 1), 1) + torch.logsumexp(torch.cat([zero, on], 1), 1)).mean()


def concordance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Lin's CCC of each column of [N, D] predictions `x` against labels `y`, with population
    moments over the N frames: 2 cov / (var x + var y + (mean x - mean y)^2). Returns [D]."""
    mx, my = x.mean(0), y.mean(0)
    cov = ((x - mx) * (y - my)).mean(0)
    return 2 * cov / (x.var(0, unbiased=False) + y.var(0, unbiased=False) + (mx - my) ** 2 + 1e-8)


def valence_arousal(outputs: torch.Tensor, y: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """1 - CCC per dimension over the batch's frames, averaged over valence and arousal (the ABAW
    teams' loss, REFERENCE 1b), on the head's [N, 2] outputs through tanh; plus `cfg.va_mse`
    times the mean squared error."""
    x = torch.tanh(outputs.float())
    loss = (1 - concordance(x, y)).mean()
    if cfg.va_mse:
        loss = loss + cfg.va_mse * F.mse_loss(x, y)
    return loss


def consistency(track: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R-Drop's term between two passes' outputs of `track`, on the scale of the track's loss: the
    symmetric KL of the class distributions (expressions, whose cross-entropy sums over classes),
    of each AU's Bernoulli, (p_a - p_b)(s_a - s_b) / 2, averaged over AUs as the binary
    cross-entropy is, or the squared difference of the values, averaged over valence and arousal as
    their loss is; averaged over frames."""
    if track == "expr":
        return symmetric_kl(a, b)
    a, b = a.float(), b.float()
    if track == "au":
        return 0.5 * ((torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)).mean()
    return (torch.tanh(a) - torch.tanh(b)).pow(2).mean()


def track_term(
    track: str, outputs: torch.Tensor, target: torch.Tensor, cfg: LossConfig, pos_weight: torch.Tensor | None
) -> torch.Tensor:
    """The configured loss of one track over its [N, width] output columns and N targets."""
    if track == "au":
        return action_units(outputs, target.float(), cfg, pos_weight)
    if track == "va":
        return valence_arousal(outputs, target.float(), cfg)
    q = soft_targets(target, outputs.shape[-1], cfg.label_smoothing)
    if cfg.name == "focal":
        return focal(outputs, q, cfg.focal_alpha, cfg.focal_gamma)
    weights = torch.tensor(cfg.class_weights, device=q.device) if cfg.class_weights else None
    return cross_entropy(outputs, q, weights)


def labelled(track: str, target: torch.Tensor) -> torch.Tensor:
    """[N] bool: the frames of N targets that carry `track`'s label (a mixed target always does)."""
    if target.is_floating_point() and track == "expr":
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    if track == "expr":
        return target >= 0
    return (target != TRACKS[track].missing).all(-1)


def objective(
    outputs: dict[str, torch.Tensor],
    targets: torch.Tensor | dict[str, torch.Tensor],
    heads: tuple[str, ...],
    cfg: LossConfig,
    mask: torch.Tensor | None = None,
    again: dict[str, torch.Tensor] | None = None,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The configured loss summed over `heads`, each weighted by `cfg.head_weights` (1 when not
    named), and over the tracks of `targets` (by track; a tensor: expressions), each on its columns
    of a head's output (`tracks.layout`) and the frames that carry its label; `again` is the second
    pass of R-Drop, `pos_weight` [12] the AU positives' weights."""
    targets = {"expr": targets} if isinstance(targets, torch.Tensor) else targets
    spans = layout(list(targets)) if len(targets) > 1 else dict.fromkeys(targets, slice(None))
    total = torch.zeros((), device=next(iter(targets.values())).device)
    for name, target in targets.items():
        y = frames(target, mask, target.is_floating_point() or name != "expr")
        keep = labelled(name, y)
        y = y[keep]
        for h in heads:
            first = frames(outputs[h], mask, True)[keep][:, spans[name]]
            term = track_term(name, first, y, cfg, pos_weight)
            if again is not None:
                second = frames(again[h], mask, True)[keep][:, spans[name]]
                term = 0.5 * (term + track_term(name, second, y, cfg, pos_weight))
                term = term + cfg.rdrop_alpha * consistency(name, first, second)
            total = total + cfg.head_weights.get(h, 1.0) * term
    return total
