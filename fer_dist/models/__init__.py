"""Models by name: `create_model("mfm", **kwargs)`.

A model is an `ExpressionModel` (models/contract.py): an nn.Module whose forward takes the
stream's inputs by keyword and returns a dict of logits per head, and which declares its inputs,
the heads it trains, the head that is its prediction, whether it takes runs of frames, and how its
image input is normalised. Nothing else about a model is known outside this package.

    mfm                   paper 000: Swin image + audio branches, Modal Fusion Module
    decoder_fusion        paper 001: static feature + GRU sequences, transformer-decoder fusion
    regnet_transformer    paper 003: RegNetY-1.6GF + transformer encoder over runs, residual fusion
    feature_lstm          paper 004: LSTM over feature runs, state carried across segments
    feature_transformer   paper 004: transformer encoder over feature segments
    face_voice_temporal   the recent winners' recipe: face ViT + wav2vec2-family voice encoder on
                          the waveform, gated or cross-attention fusion, transformer or TCN
    face_voice_temporal_features  the same on feature shards of both frozen encoders
"""

from __future__ import annotations

import inspect

from fer_dist.config import ConfigError
from fer_dist.models.contract import ExpressionModel
from fer_dist.models.decoder_fusion import DecoderFusionNet
from fer_dist.models.mfm import ModalFusionNet
from fer_dist.models.recipe import FaceVoiceFeatures, FaceVoiceTemporal
from fer_dist.models.regnet_transformer import RegNetTransformer
from fer_dist.models.temporal import FeatureLSTM, FeatureTransformer

MODELS: dict[str, type[ExpressionModel]] = {
    "mfm": ModalFusionNet,
    "decoder_fusion": DecoderFusionNet,
    "regnet_transformer": RegNetTransformer,
    "feature_lstm": FeatureLSTM,
    "feature_transformer": FeatureTransformer,
    "face_voice_temporal": FaceVoiceTemporal,
    "face_voice_temporal_features": FaceVoiceFeatures,
}


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **kwargs) -> ExpressionModel:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    cls = MODELS[name]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name} does not take {', '.join(unknown)}; it takes {', '.join(list(accepted)[1:])}")
    missing = [k for k, p in list(accepted.items())[1:] if p.default is p.empty and k not in kwargs]
    if missing:
        raise ConfigError(
            f"model {name} needs {', '.join(missing)}: per-frame features of feature shards (`fer-dist extract`), "
            "or set them under model"
        )
    return cls(**kwargs)


def build(
    model_cfg: dict,
    image_size: int,
    audio_size: list[int],
    features: dict[str, int] | None = None,
    outputs: int = 8,
) -> ExpressionModel:
    """The configured model; input sizes and feature widths come from the data when the model
    takes them and the config does not set them. `outputs` is each head's width, the run's tracks'
    columns (`tracks.layout`: 8 expression logits, 12 AU logits, valence and arousal); a config that
    sets `model.outputs` itself is refused (ConfigError)."""
    if "outputs" in model_cfg:
        raise ConfigError("model.outputs is set by the run's tracks (tracks=[expr], [au] or [va]), not by the config")
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    accepted = inspect.signature(MODELS.get(model_cfg["name"], object).__init__).parameters
    given = {"image_size": image_size, "audio_size": tuple(audio_size), "outputs": outputs, **(features or {})}
    for key, value in given.items():
        if key in accepted:
            kwargs.setdefault(key, value)
    return create_model(model_cfg["name"], **kwargs)
