"""The recipe of the expression track's recent winners: a pretrained ViT on faces, a wav2vec2-family
encoder on the raw waveform, fusion, and a temporal model over runs of frames.

Each frame of a clip-mode run gives a face embedding (any timm model, MAE- or DINOv2-pretrained
ViTs among them, weights from a local file, inputs normalised as its pretrained config says) and
a voice embedding (`models/speech.py`, on the frame's waveform window). Both are projected to
`dim`; each has its own per-frame head. The fusion is `gated` (a per-channel sigmoid gate
between the two) or `cross` (each modality attends to the other's embeddings over the run). In
training, `modality_dropout` replaces one modality of a run, drawn at random, with a learned
stand-in before the fusion, so that the fused head learns to do without either. A `transformer`
(pre-norm, sinusoidal positions) or a `tcn` (dilated residual convolutions, kernel 3) then
models time over the run's real frames, and the fusion head scores every frame.

`face_voice_temporal_features` is the same after the encoders: it reads their outputs from feature
shards made once by `fer-dist extract --backbone ... --speech-encoder ...`, for GPUs too small to
fine-tune both encoders.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_dist.config import ConfigError
from fer_dist.models.backbones import create_backbone
from fer_dist.models.contract import ExpressionModel, normalisation_of
from fer_dist.models.layers import real_frames, sinusoid
from fer_dist.models.speech import SpeechEncoder


def drop_modalities(v: torch.Tensor, a: torch.Tensor, missing: torch.Tensor, p: float) -> tuple:
    """For a share `p` of the runs [B, L, D], one modality (either, equally likely) replaced by
    its stand-in `missing` [2, D]."""
    dropped = torch.rand(v.shape[0], device=v.device) < p
    face = torch.rand(v.shape[0], device=v.device) < 0.5
    v = torch.where((dropped & face)[:, None, None], missing[0], v)
    a = torch.where((dropped & ~face)[:, None, None], missing[1], a)
    return v, a


class TCN(nn.Module):
    """Residual blocks of a dilated (1, 2, 4, ...) convolution over the run; padded frames are
    zeroed before every convolution, so they never reach a real frame."""

    def __init__(self, dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(dim, dim, 3, padding=2**i, dilation=2**i), nn.GELU(), nn.Dropout(dropout))
            for i in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block((x * keep[..., None]).transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class Temporal(nn.Module):
    def __init__(self, kind: str, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        if kind not in ("transformer", "tcn"):
            raise ConfigError(f"model.temporal must be transformer or tcn, not {kind!r}")
        self.kind = kind
        if kind == "tcn":
            self.tcn = TCN(dim, layers, dropout)
        else:
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.kind == "tcn":
            return self.tcn(x, keep)
        x = x + sinusoid(x.shape[1], x.shape[2], x.device)
        return self.transformer(x, src_key_padding_mask=~keep)


class FusedRuns(ExpressionModel):
    """What both forms of the recipe share: per-frame face and voice embeddings projected to
    `dim`, a head on each, fusion, modality dropout, the temporal model and the fused head."""

    heads = ("image", "audio", "fusion")
    output = "fusion"
    sequences = True

    def __init__(
        self,
        face_dim: int,
        voice_dim: int,
        dim: int,
        fusion: str,
        modality_dropout: float,
        temporal: str,
        temporal_layers: int,
        num_heads: int,
        dropout: float,
        outputs: int,
    ) -> None:
        super().__init__()
        if fusion not in ("gated", "cross"):
            raise ConfigError(f"model.fusion must be gated or cross, not {fusion!r}")
        self.face_proj = nn.Sequential(nn.LayerNorm(face_dim), nn.Linear(face_dim, dim))
        self.voice_proj = nn.Sequential(nn.LayerNorm(voice_dim), nn.Linear(voice_dim, dim))
        self.missing = nn.Parameter(torch.zeros(2, dim))
        self.fusion, self.modality_dropout = fusion, modality_dropout
        if fusion == "gated":
            self.gate = nn.Linear(2 * dim, dim)
        else:
            self.face_to_voice = nn.MultiheadAttention(dim, num_heads, dropout, batch_first=True)
            self.voice_to_face = nn.MultiheadAttention(dim, num_heads, dropout, batch_first=True)
            self.fuse_norm = nn.LayerNorm(dim)
        self.temporal = Temporal(temporal, dim, temporal_layers, num_heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.image_head, self.audio_head = nn.Linear(dim, outputs), nn.Linear(dim, outputs)
        self.fusion_head = nn.Linear(dim, outputs)

    def fuse(self, v: torch.Tensor, a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.fusion == "gated":
            g = torch.sigmoid(self.gate(torch.cat([v, a], -1)))
            return g * v + (1 - g) * a
        heard = self.face_to_voice(v, a, a, key_padding_mask=~keep, need_weights=False)[0]
        seen = self.voice_to_face(a, v, v, key_padding_mask=~keep, need_weights=False)[0]
        return self.fuse_norm(v + a + heard + seen)

    def score(self, face: torch.Tensor, voice: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """face [B, L, face_dim], voice [B, L, voice_dim], keep [B, L] -> each head's logits."""
        v, a = self.face_proj(face), self.voice_proj(voice)
        out = {"image": self.image_head(self.drop(v)), "audio": self.audio_head(self.drop(a))}
        if self.training and self.modality_dropout:
            v, a = drop_modalities(v, a, self.missing, self.modality_dropout)
        x = self.temporal(self.fuse(v, a, keep), keep)
        return {**out, "fusion": self.fusion_head(self.drop(x))}


class FaceVoiceTemporal(FusedRuns):
    """The recipe end to end: the face and speech encoders run on every frame of the run."""

    inputs = ("image", "wave")

    def __init__(
        self,
        image_backbone: str = "vit_base_patch16_224.mae",
        image_size: int = 224,
        image_backbone_args: dict | None = None,
        pretrained: bool | str = False,
        train_image: bool = True,
        speech_encoder: str = "wavlm_base",
        speech_weights: str | None = None,
        train_speech: bool = False,
        dim: int = 256,
        fusion: str = "gated",
        modality_dropout: float = 0.2,
        temporal: str = "transformer",
        temporal_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
        outputs: int = 8,
    ) -> None:
        face = create_backbone(
            image_backbone, in_chans=3, img_size=image_size, pretrained=pretrained, **(image_backbone_args or {})
        )
        voice = SpeechEncoder(speech_encoder, speech_weights, trainable=train_speech)
        super().__init__(
            face.num_features,
            voice.dim,
            dim,
            fusion,
            modality_dropout,
            temporal,
            temporal_layers,
            num_heads,
            dropout,
            outputs,
        )
        self.face, self.voice = face, voice
        self.train_image = train_image
        self.face.requires_grad_(train_image)
        self.image_normalisation = normalisation_of(self.face)

    def train(self, mode: bool = True) -> FaceVoiceTemporal:
        super().train(mode)
        self.face.train(mode and self.train_image)  # a frozen face encoder stays in eval mode
        return self

    def forward(
        self, image: torch.Tensor, wave: torch.Tensor, wave_lengths: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        b, length = image.shape[:2]
        face = self.face.forward_head(self.face.forward_features(image.flatten(0, 1)), pre_logits=True)
        voice = self.voice(wave.flatten(0, 1), wave_lengths.flatten())
        return self.score(face.unflatten(0, (b, length)), voice.unflatten(0, (b, length)), real_frames(image, mask))


class FaceVoiceFeatures(FusedRuns):
    """The recipe on feature shards (`fer-dist extract --speech-encoder ...`), the way to train it
    on an 11 GB GPU: both encoders frozen and run once. `embedding` is the face encoder's pooled
    feature [B, L, D]; `voice` the speech encoder's layers, each averaged over the frame's window
    [B, L, layers, D'], summed here with learned softmax weights as the end-to-end model does."""

    inputs = ("embedding", "voice")

    def __init__(
        self,
        embedding_dim: int,
        voice_dim: int,
        voice_layers: int,
        dim: int = 256,
        fusion: str = "gated",
        modality_dropout: float = 0.2,
        temporal: str = "transformer",
        temporal_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
        outputs: int = 8,
    ) -> None:
        super().__init__(
            embedding_dim,
            voice_dim,
            dim,
            fusion,
            modality_dropout,
            temporal,
            temporal_layers,
            num_heads,
            dropout,
            outputs,
        )
        self.layer_weights = nn.Parameter(torch.zeros(voice_layers))

    def forward(
        self, embedding: torch.Tensor, voice: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        voice = torch.einsum("l,bnld->bnd", self.layer_weights.softmax(0), voice)
        return self.score(embedding, voice, real_frames(embedding, mask))
