"""Transformer fusion of a static vision feature with dynamic sequences: paper 001
(Transformer-based Multimodal Information Fusion for Facial Expression Analysis).

For every frame t of a run:

- the static vision feature h_s: a timm backbone over the frame's crop (Inception-ResNet in the
  paper), kept as its token map (the keys and values below) and pooled (for the MLP);
- dynamic sequences of the frames t - M .. t + M (M = 60) of the run: the per-frame expression
  embeddings r_e of a frozen backbone, the audio features r_a (MFCC, pitch, short-time energy) and,
  when the shards hold them, word embeddings r_w (feature shards from `fer-dist extract`);
- each sequence is encoded by its own GRU into h_e, h_a, h_w, then fused by its own transformer
  decoder whose second (cross) attention takes h_s as keys and values: Q = h', K = V = h_s;
- the decoders' outputs, pooled over the real frames of the neighbourhood, are concatenated with
  the pooled h_s and classified by an MLP.

Neighbours outside the run are missing (zeros, flagged as such): pack clips longer than the run
for full context at the run's edges.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_dist.models.backbones import create_backbone, tokens
from fer_dist.models.contract import normalisation_of
from fer_dist.models.layers import RunScorer, mlp, neighbourhoods, real_frames


class DecoderFusionNet(RunScorer):
    def __init__(
        self,
        embedding_dim: int,
        audio_features_dim: int,
        words_dim: int = 0,
        static_backbone: str = "inception_resnet_v2",
        static_backbone_args: dict | None = None,
        pretrained: bool | str = False,
        context: int = 60,
        dim: int = 256,
        gru_layers: int = 1,
        decoder_layers: int = 1,
        decoder_heads: int = 4,
        mlp_dims: tuple[int, ...] = (512,),
        dropout: float = 0.1,
        outputs: int = 8,
    ) -> None:
        super().__init__()
        self.context = context
        dims = {"embedding": embedding_dim, "audio_features": audio_features_dim}
        if words_dim:
            dims["words"] = words_dim
        self.inputs = ("image", *dims)
        self.static = create_backbone(
            static_backbone, in_chans=3, img_size=None, pretrained=pretrained, **(static_backbone_args or {})
        )
        self.image_normalisation = normalisation_of(self.static)
        static_dim = self.static.num_features
        self.static_proj = nn.Linear(static_dim, dim)
        self.gru = nn.ModuleDict(
            {
                name: nn.GRU(d + 1, dim, gru_layers, batch_first=True, dropout=dropout if gru_layers > 1 else 0.0)
                for name, d in dims.items()
            }
        )
        self.decoder = nn.ModuleDict(
            {
                name: nn.TransformerDecoder(
                    nn.TransformerDecoderLayer(dim, decoder_heads, 4 * dim, dropout, batch_first=True),
                    decoder_layers,
                )
                for name in dims
            }
        )
        self.mlp = mlp([static_dim + dim * len(dims), *mlp_dims], outputs, dropout)

    def static_feature(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_s of every frame [N, 3, S, S]: the keys and values [N, T, dim] and the pooled [N, C]."""
        t = tokens(self.static, image)
        return self.static_proj(t), t.mean(1)

    def forward(
        self,
        image: torch.Tensor,
        embedding: torch.Tensor,
        audio_features: torch.Tensor,
        words: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        b, length = image.shape[:2]
        keep = real_frames(embedding, mask)
        memory, pooled = self.static_feature(image.flatten(0, 1))
        fused = [pooled]
        sequences = {"embedding": embedding, "audio_features": audio_features, "words": words}
        for name in self.gru:
            windows, real = neighbourhoods(sequences[name], keep, self.context)
            h, _ = self.gru[name](windows)
            padding = ~real & real.any(1, keepdim=True)  # a window of padding only attends to all of it, finitely
            out = self.decoder[name](h, memory, tgt_key_padding_mask=padding)  # cross-attention: K = V = h_s
            fused.append((out * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1))
        return {"output": self.mlp(torch.cat(fused, dim=-1)).unflatten(0, (b, length))}
