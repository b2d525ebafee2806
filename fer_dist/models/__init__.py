"""Models by name: `create_model("mfm", **kwargs)`.

A model is an nn.Module whose forward takes the stream's inputs by keyword (`image`, `audio`)
and returns a dict of logits per head; `heads` names the heads its loss trains, `output` the head
that is its prediction and `sequences` whether it takes clip-mode runs [B, L, ...] of frames.
Nothing else about a model is known outside this package.
"""

from __future__ import annotations

import inspect

from torch import nn

from fer_dist.models.mfm import ModalFusionNet

MODELS: dict[str, type[nn.Module]] = {"mfm": ModalFusionNet}


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    cls = MODELS[name]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name} does not take {', '.join(unknown)}; it takes {', '.join(list(accepted)[1:])}")
    return cls(**kwargs)


def build(model_cfg: dict, image_size: int, audio_size: list[int]) -> nn.Module:
    """The configured model; input sizes come from the data section when the model takes them."""
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    accepted = inspect.signature(MODELS.get(model_cfg["name"], object).__init__).parameters
    for key, value in (("image_size", image_size), ("audio_size", tuple(audio_size))):
        if key in accepted:
            kwargs.setdefault(key, value)
    return create_model(model_cfg["name"], **kwargs)
