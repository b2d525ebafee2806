"""wav2vec2-family speech encoders on raw 16 kHz waveforms, from torchaudio's model builders.

    wav2vec2_base, hubert_base, wavlm_base      the base architectures (95 M parameters, 12 layers)
    wav2vec2_large, hubert_large, wavlm_large   the large ones (24 layers)
    wav2vec2_tiny, wavlm_tiny                   2-layer, 64-wide versions of the two layer types,
                                                for CPU runs (HuBERT's layers are wav2vec2's)

Weights come from a local file, never from the network: a state dict in torchaudio's layout (what
`torchaudio.pipelines.<BUNDLE>.get_model().state_dict()` holds, or a Hugging Face checkpoint
converted with `torchaudio.models.wav2vec2.utils.import_huggingface_model`), saved as safetensors
or with `torch.save`, read with `weights_only=True`. The encoder's output for a window is a
learned softmax-weighted sum of its transformer layers (the layers of self-supervised speech
models carry different information, the middle ones the most paralinguistic), averaged over the
window's frames.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torchaudio
from safetensors.torch import load_file
from torch import nn
from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

from fer_dist.config import ConfigError

TINY_EXTRACTOR = [(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 2, 2), (32, 2, 2)]  # 320x, as base
TINY = {
    "extractor_mode": "group_norm",
    "extractor_conv_layer_config": TINY_EXTRACTOR,
    "extractor_conv_bias": False,
    "encoder_embed_dim": 64,
    "encoder_projection_dropout": 0.0,
    "encoder_pos_conv_kernel": 32,
    "encoder_pos_conv_groups": 4,
    "encoder_num_layers": 2,
    "encoder_num_heads": 2,
    "encoder_attention_dropout": 0.0,
    "encoder_ff_interm_features": 128,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_norm_first": False,
    "encoder_layer_drop": 0.0,
    "aux_num_out": None,
}
ENCODERS = {
    "wav2vec2_base": torchaudio.models.wav2vec2_base,
    "hubert_base": torchaudio.models.hubert_base,
    "wavlm_base": torchaudio.models.wavlm_base,
    "wav2vec2_large": torchaudio.models.wav2vec2_large,
    "hubert_large": torchaudio.models.hubert_large,
    "wavlm_large": torchaudio.models.wavlm_large,
    "wav2vec2_tiny": functools.partial(torchaudio.models.wav2vec2_model, **TINY),
    "wavlm_tiny": functools.partial(
        torchaudio.models.wavlm_model, **TINY, encoder_num_buckets=320, encoder_max_distance=800
    ),
}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a `torch.save` file read with
    `weights_only=True` (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights {path} not found")
    if path.suffix == ".safetensors":
        return load_file(path)
    weights = torch.load(path, map_location="cpu", weights_only=True)
    return weights.get("state_dict", weights) if isinstance(weights, dict) else weights


def create_speech_encoder(name: str, weights: str | None = None) -> nn.Module:
    """A torchaudio Wav2Vec2Model by name, with `weights` loaded when given (also as saved from a
    pipeline's wrapper, under `model.`); keys of an ASR head (`aux.`) are ignored, any other
    mismatch is a ConfigError."""
    if name not in ENCODERS:
        raise ConfigError(f"speech encoder {name!r} is not one of {', '.join(ENCODERS)}")
    model = ENCODERS[name]()
    if weights:
        state = read_weights(weights)
        if all(k.startswith("model.") for k in state):  # a pipeline's wrapper around the model
            state = {k.removeprefix("model."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("aux.")}
        own = model.state_dict()
        misfits = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
        if misfits:
            raise ConfigError(f"{weights} does not fit {name}: {len(misfits)} tensors differ (first: {misfits[0]})")
        model.load_state_dict(state)
    return model


def standardise(wave: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each window to zero mean and unit variance over its own samples, as the bundles' wrappers
    do to a whole utterance (`layer_norm`, same eps); the silence after it stays silent."""
    valid = (torch.arange(wave.shape[1], device=wave.device) < lengths[:, None]).to(wave.dtype)
    count = lengths[:, None].clamp(min=1).to(wave.dtype)
    mean = (wave * valid).sum(1, keepdim=True) / count
    var = ((wave - mean) * valid).square().sum(1, keepdim=True) / count
    return (wave - mean) * torch.rsqrt(var + eps) * valid


class SpeechEncoder(nn.Module):
    """Waveform windows [N, T] in [-1, 1] and their lengths [N] to one embedding each [N, dim].
    `trainable=False` keeps the encoder frozen (and in eval mode); the layer weights always train."""

    def __init__(self, name: str, weights: str | None = None, trainable: bool = False) -> None:
        super().__init__()
        self.model = create_speech_encoder(name, weights)
        self.trainable = trainable
        self.model.requires_grad_(trainable)
        self.dim = self.model.encoder.feature_projection.projection.out_features
        # torchaudio's WavLM attention takes no padding mask
        self.masked = not isinstance(self.model.encoder.transformer.layers[0].attention, WavLMSelfAttention)
        self.layer_weights = nn.Parameter(torch.zeros(len(self.model.encoder.transformer.layers)))
        # torchaudio's bundles standardise the waveform for exactly the encoders whose extractor is
        # layer-normed (the large LV-60k, XLSR, HuBERT and WavLM ones), in the wrapper around the model
        self.standardised = isinstance(self.model.feature_extractor.conv_layers[0].layer_norm, nn.LayerNorm)

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        self.model.train(mode and self.trainable)
        return self

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """How many encoder frames the first `lengths` samples make (the convolutions' arithmetic)."""
        for layer in self.model.feature_extractor.conv_layers:
            kernel, stride = layer.conv.kernel_size[0], layer.conv.stride[0]
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def layer_means(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[N, layers, D]: each transformer layer's output averaged over the window's frames. The
        silence after the batch's longest window is cut first: it costs as much as speech and,
        through the extractor's group norm (base models), changes what the windows give. Without
        a padding mask (WavLM) the frames also attend to the silence after a shorter window,
        which the average then leaves out."""
        wave = wave[:, : int(lengths.max())]
        if self.standardised:
            wave = standardise(wave, lengths)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            layers, _ = self.model.extract_features(wave, lengths if self.masked else None)
        stacked = torch.stack(layers, 1)
        valid = (torch.arange(stacked.shape[2], device=wave.device) < self.frames(lengths)[:, None]).to(stacked.dtype)
        return torch.einsum("nltd,nt->nld", stacked, valid) / valid.sum(1).clamp(min=1)[:, None, None]

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[N, D]: the layers' window averages summed with the learned softmax weights."""
        return torch.einsum("l,nld->nd", self.layer_weights.softmax(0), self.layer_means(wave, lengths))
