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


@dataclass
class Step:
    inputs: dict[str, torch.Tensor]  # the model's keyword arguments
    target: torch.Tensor  # class indices, or soft targets [..., C] after mixing
    mask: torch.Tensor | None  # clip mode: the real frames of the runs
    frames: int  # labelled frames in the batch (counted on the host: no device sync)


def model_for(cfg: Config, manifest: Manifest, training: bool = True) -> ExpressionModel:
    """The configured model, checked against the shards it will read: the inputs they hold, frames
    or runs as the model takes them, and (training) loss weights only for heads it trains."""
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size, manifest.feature_dims())
    pipeline.check(cfg.data, manifest, model.inputs, training)
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
        self.heads, self.normalisation = model.heads, model.image_normalisation

    def prepare(self, batch: dict, device: torch.device, train: bool) -> Step:
        data = self.cfg.data
        inputs = prepare(batch, device, data, self.manifest, train, self.normalisation)
        target = batch["label"].to(device)
        mask = batch.get("mask")
        frames = int(mask.sum()) if mask is not None else len(batch["label"])
        if train and data.mix != "none":
            inputs, target = mix(inputs, target, data, self.class_counts, NUM_CLASSES)
        if self.cfg.train.channels_last:
            inputs = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()
            }
        if mask is not None:  # sequence models leave the padding of short runs out of their attention
            mask = mask.to(device)
            inputs["mask"] = mask
        return Step(inputs, target, mask, frames)

    def forward(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], autocast: Callable[[], AbstractContextManager]
    ) -> dict[str, torch.Tensor]:
        """The model's logits per head ([..., C] each) for prepared inputs, under the precision's
        autocast: the one forward pass of training and evaluation."""
        with autocast():
            return model(**inputs)

    def loss(self, model: torch.nn.Module, step: Step, autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
        """The configured loss of one forward pass; with R-Drop, of two passes with their own dropout,
        run as one forward over the batch stacked on itself, so that DDP sees one forward per backward."""
        twice = self.cfg.loss.rdrop_alpha > 0
        inputs = {k: torch.cat([v, v]) for k, v in step.inputs.items()} if twice else step.inputs
        outputs = self.forward(model, inputs, autocast)
        again = None
        if twice:
            n = step.target.shape[0]
            outputs, again = {h: v[:n] for h, v in outputs.items()}, {h: v[n:] for h, v in outputs.items()}
        return objective(outputs, step.target, self.heads, self.cfg.loss, step.mask, again)
