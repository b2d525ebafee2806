"""Temporal encoders over pre-extracted features: paper 004 (Multi-modal Expression Recognition
with Ensemble Method).

A frame's visual and audio features (feature shards from `fer-dist extract`) are concatenated and
mapped by a fully connected layer to f^m (Eq. 1). A run of frames is then encoded by

- `FeatureLSTM`: the run is cut into segments of `segment` frames (stride = length, no overlap)
  and the LSTM's last hidden state of segment i - 1 starts segment i (Eq. 2). The state is carried
  as a value, not back-propagated through (the segments exist to bound memory);
- `FeatureTransformer`: a transformer encoder over the run (segment 128, 4 layers, 4 heads, width
  1024, dropout 0.3 in the paper), each segment on its own.

Both end in head layers of 512 and 256 units and score every frame of the run.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_dist.models.layers import RunScorer, mlp, real_frames, sinusoid


class FeatureEncoder(RunScorer):
    """f^m = FC([f^v, f^a]) and the 512-256 head, around a temporal encoder."""

    def __init__(
        self,
        embedding_dim: int,
        audio_features_dim: int,
        affine_dim: int,
        encoded_dim: int,
        head_dims: tuple[int, ...],
        dropout: float,
        outputs: int,
    ) -> None:
        super().__init__()
        self.inputs = ("embedding", "audio_features")
        self.affine = nn.Sequential(nn.Linear(embedding_dim + audio_features_dim, affine_dim), nn.ReLU())
        self.head = mlp([encoded_dim, *head_dims], outputs, dropout)

    def encode(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, embedding: torch.Tensor, audio_features: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        f = self.affine(torch.cat([embedding, audio_features], dim=-1))
        return {"output": self.head(self.encode(f, real_frames(f, mask)))}


class FeatureLSTM(FeatureEncoder):
    def __init__(
        self,
        embedding_dim: int,
        audio_features_dim: int,
        affine_dim: int = 1024,
        hidden: int = 512,
        layers: int = 1,
        segment: int = 64,
        head_dims: tuple[int, ...] = (512, 256),
        dropout: float = 0.3,
        outputs: int = 8,
    ) -> None:
        super().__init__(embedding_dim, audio_features_dim, affine_dim, hidden, head_dims, dropout, outputs)
        self.segment = segment
        self.lstm = nn.LSTM(affine_dim, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

    def encode(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Segment by segment, each starting from the last state of the one before (Eq. 2);
        padding sits at the end of a run, after every real frame, so it changes none of theirs."""
        outputs, state = [], None
        for part in f.split(self.segment, dim=1):
            out, state = self.lstm(part, state)
            outputs.append(out)
            state = tuple(s.detach() for s in state)
        return torch.cat(outputs, dim=1)


class FeatureTransformer(FeatureEncoder):
    def __init__(
        self,
        embedding_dim: int,
        audio_features_dim: int,
        affine_dim: int = 1024,
        layers: int = 4,
        num_heads: int = 4,
        ff_dim: int = 2048,
        segment: int = 128,
        head_dims: tuple[int, ...] = (512, 256),
        dropout: float = 0.3,
        outputs: int = 8,
    ) -> None:
        super().__init__(embedding_dim, audio_features_dim, affine_dim, affine_dim, head_dims, dropout, outputs)
        self.segment = segment
        layer = nn.TransformerEncoderLayer(affine_dim, num_heads, ff_dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def encode(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Each segment of the run on its own: no context crosses a segment's border."""
        outputs = []
        for part, kept in zip(f.split(self.segment, dim=1), keep.split(self.segment, dim=1), strict=True):
            x = part + sinusoid(part.shape[1], part.shape[2], part.device).to(part.dtype)
            empty = ~kept.any(1, keepdim=True)  # a row whose segment is all padding attends to it all, finitely
            out = self.encoder(x, src_key_padding_mask=~kept & ~empty)
            outputs.append(torch.where(kept[..., None], out, torch.zeros_like(out)))
        return torch.cat(outputs, dim=1)
