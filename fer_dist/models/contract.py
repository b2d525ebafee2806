"""What every model declares: the one thing the rest of fer-dist knows about a model.

inputs               what forward() takes by keyword: image, audio, embedding, audio_features, words
heads                the heads its loss trains (forward returns raw outputs [..., outputs] for each)
output               the head that is its prediction: one of `heads`, or "ensemble"
ensemble             the heads whose mean prediction is the "ensemble" output (paper 000: image,
                     audio and fusion); the engine averages them per track (mean class or AU
                     probability, mean valence-arousal: `engine/task.py`), as a model knows its
                     heads' widths but not the tracks their columns hold
sequences            takes clip-mode runs [B, L, ...] (and `mask`, their real frames), not frames
image_normalisation  (mean, std) per RGB channel the `image` input is standardised with: its
                     image backbone's, from timm's pretrained config, so pretrained weights see
                     inputs as they were trained on
"""

from __future__ import annotations

from torch import nn

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]  # mean and std per RGB channel
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # mean and std per RGB channel


class ExpressionModel(nn.Module):
    inputs: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    output: str = ""
    ensemble: tuple[str, ...] = ()
    sequences: bool = False
    image_normalisation: Normalisation = IMAGENET


def normalisation_of(backbone: nn.Module) -> Normalisation:
    """The mean and std a timm backbone's pretrained weights expect (ImageNet's when it says none)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET[0]), cfg.get("std", IMAGENET[1])
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
