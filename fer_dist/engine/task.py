"""Between the stream and the model: a decoded batch becomes the model's inputs, and its outputs a loss.

    batch -> on-device preparation (resize, augmentation, the model's normalisation, standardised
             audio and features) -> [clip mask] -> [mixup / Remix] -> model -> [R-Drop's second pass]
          -> the configured loss over the model's heads

Everything a model or a training trick needs from a batch happens here, so the loop only moves
batches and steps the optimiser, and evaluation predicts through the same preparation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from fer_dist.config import Config, ConfigError
from fer_dist.data.shards.format import Manifest
from fer_dist.data.stream import pipeline
from fer_dist.data.stream.transforms import mix, prepare
from fer_dist.engine.losses import objective
from fer_dist.labels import NUM_CLASSES
from fer_dist.models import build
from fer_dist.models.contract import ExpressionModel
from fer_dist.tracks import TRACKS, layout

MEMBER = {"expr": "label", "au": "au", "va": "va"}  # each track's labels in a batch (`data/stream/decode.py`)


@dataclass
class Step:
    inputs: dict[str, torch.Tensor]  # the model's keyword arguments
    targets: dict[str, torch.Tensor]  # by track: expression class indices [...] (soft [..., 8] after
    # mixing), AU 0/1 [..., 12] (-1: not labelled), valence-arousal [..., 2] (-5: not labelled)
    mask: torch.Tensor | None  # clip mode: the real frames of the runs
    frames: int  # labelled frames in the batch (counted on the host: no device sync)


def width(tracks: list[str] | tuple[str, ...]) -> int:
    """A head's output columns for the run's `tracks` (`tracks.layout`)."""
    return sum(TRACKS[t].outputs for t in tracks)


def au_pos_weight(cfg: Config, manifest: Manifest | None) -> torch.Tensor | None:
    """[12] weights of each AU's positives in its binary cross-entropy: negatives / positives over
    the training fold groups' frames (`loss.au_pos_weight: counts`), its square root (`sqrt`), or
    None (`none`, an evaluation, a run of another track). An AU never on in training weighs 1."""
    if "au" not in cfg.tracks or cfg.loss.au_pos_weight == "none" or manifest is None:
        return None
    counts = [manifest.groups[g].tracks.get("au") for g in manifest.fold_groups(cfg.data.holdout_fold)]
    positives = torch.tensor([c.counts for c in counts if c], dtype=torch.float64).sum(0)
    frames = sum(c.samples for c in counts if c)
    ratio = torch.where(positives > 0, (frames - positives) / positives.clamp_min(1), torch.ones_like(positives))
    return (ratio.sqrt() if cfg.loss.au_pos_weight == "sqrt" else ratio).float()


def ensembled(outputs: dict[str, torch.Tensor], heads: tuple[str, ...], tracks: list[str]) -> torch.Tensor:
    """The mean prediction of `heads` ([..., columns] raw outputs each), per track, as that track's
    raw outputs again (`tracks.layout`): the log of the mean class probabilities (expressions,
    paper 000), the logit of each AU's mean probability, the atanh of the mean valence and arousal."""
    parts = []
    for name, cols in layout(tracks).items():
        x = torch.stack([outputs[h][..., cols].float() for h in heads])
        if name == "expr":
            parts.append(x.softmax(-1).mean(0).clamp_min(1e-12).log())
        elif name == "au":
            parts.append(torch.logit(x.sigmoid().mean(0), eps=1e-6))
        else:
            parts.append(torch.atanh(x.tanh().mean(0).clamp(-1 + 1e-6, 1 - 1e-6)))
    return torch.cat(parts, -1)


def model_for(cfg: Config, manifest: Manifest, training: bool = True) -> ExpressionModel:
    """The configured model, checked against the shards it will read: the inputs they hold, frames
    or runs as the model takes them, and (training) loss weights only for heads it trains."""
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size, manifest.feature_dims(), width(cfg.tracks))
    pipeline.check(cfg.data, manifest, model.inputs, training, tuple(cfg.tracks))
    strangers = sorted(set(cfg.loss.head_weights) - set(model.heads))
    if training and strangers:
        raise ConfigError(
            f"loss.head_weights names {', '.join(strangers)}; this model trains the heads {', '.join(model.heads)}"
        )
    if model.sequences != bool(cfg.data.sequence_length):
        kind = (
            "runs of frames (set data.sequence_length)" if model.sequences else "single frames (data.sequence_length=0)"
        )
        raise ConfigError(f"model {cfg.model['name']} takes {kind}")
    return model


class Task:
    """What training and evaluation do with a batch, for one model and one set of shards;
    `class_counts` (the classes the stream reads) are Remix's label rule."""

    def __init__(
        self, cfg: Config, manifest: Manifest | None, model: ExpressionModel, class_counts: torch.Tensor | None = None
    ) -> None:
        self.cfg, self.manifest, self.class_counts = cfg, manifest, class_counts
        self.heads, self.normalisation, self.ensemble = model.heads, model.image_normalisation, model.ensemble
        self.pos_weight = au_pos_weight(cfg, manifest)

    def prepare(self, batch: dict, device: torch.device, train: bool) -> Step:
        data = self.cfg.data
        inputs = prepare(batch, device, data, self.manifest, train, self.normalisation)
        targets = {t: batch[MEMBER[t]].to(device) for t in self.cfg.tracks}
        if self.pos_weight is not None:
            self.pos_weight = self.pos_weight.to(device)  # once: then already there
        mask = batch.get("mask")
        frames = int(mask.sum()) if mask is not None else len(batch["label"])
        if train and data.mix != "none":  # expression runs only (config.validate)
            inputs, targets["expr"] = mix(inputs, targets["expr"], data, self.class_counts, NUM_CLASSES)
        if self.cfg.train.channels_last:
            inputs = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()
            }
        if mask is not None:  # sequence models leave the padding of short runs out of their attention
            mask = mask.to(device)
            inputs["mask"] = mask
        return Step(inputs, targets, mask, frames)

    def forward(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], autocast: Callable[[], AbstractContextManager]
    ) -> dict[str, torch.Tensor]:
        """The model's raw outputs per head ([..., columns] each) for prepared inputs, under the
        precision's autocast, with its "ensemble" output when it has one (`ensembled`): the one
        forward pass of training and evaluation."""
        with autocast():
            outputs = model(**inputs)
        if self.ensemble:
            outputs["ensemble"] = ensembled(outputs, self.ensemble, self.cfg.tracks)
        return outputs

    def loss(self, model: torch.nn.Module, step: Step, autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
        """The configured loss of one forward pass; with R-Drop, of two passes with their own dropout,
        run as one forward over the batch stacked on itself, so that DDP sees one forward per backward."""
        twice = self.cfg.loss.rdrop_alpha > 0
        inputs = {k: torch.cat([v, v]) for k, v in step.inputs.items()} if twice else step.inputs
        outputs = self.forward(model, inputs, autocast)
        again = None
        if twice:
            n = next(iter(step.targets.values())).shape[0]
            outputs, again = {h: v[:n] for h, v in outputs.items()}, {h: v[n:] for h, v in outputs.items()}
        return objective(outputs, step.targets, self.heads, self.cfg.loss, step.mask, again, self.pos_weight)
