"""RegNetY-1.6GF with a transformer encoder over runs of frames: paper 003 (Facial Expression
Classification using Fusion of Deep Neural Network in Video).

Each 112x112 crop of a run of 64 frames gives a backbone feature x (888 numbers for timm's
`regnety_016`). The run goes through a transformer encoder F: one block whose two attention heads
are 64 wide each (the heads get their own width, not a split of x's) and whose feed-forward layer
has 512 units. The fusion is residual, y = x + F(x); dropout 0.5 and a linear layer give every
frame's class scores. Attention skips the padding at the end of short runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_dist.models.backbones import create_backbone
from fer_dist.models.contract import normalisation_of
from fer_dist.models.layers import RunScorer, real_frames


class EncoderBlock(nn.Module):
    """Post-norm transformer encoder block with `heads` heads of `head_dim` each."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        x = self.norm1(x + self.drop(self.proj(a.transpose(1, 2).flatten(2))))
        return self.norm2(x + self.drop(self.ff(x)))


class RegNetTransformer(RunScorer):
    inputs = ("image",)

    def __init__(
        self,
        backbone: str = "regnety_016",
        backbone_args: dict | None = None,
        pretrained: bool | str = False,
        depth: int = 1,
        num_heads: int = 2,
        head_dim: int = 64,
        ff_dim: int = 512,
        attention_dropout: float = 0.1,
        dropout: float = 0.5,
        outputs: int = 8,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone, in_chans=3, img_size=None, pretrained=pretrained, **(backbone_args or {})
        )
        self.image_normalisation = normalisation_of(self.backbone)
        dim = self.backbone.num_features
        self.encoder = nn.ModuleList(
            EncoderBlock(dim, num_heads, head_dim, ff_dim, attention_dropout) for _ in range(depth)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, outputs)

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """F(x): the transformer encoder over the run."""
        for block in self.encoder:
            x = block(x, keep)
        return x

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b, length = image.shape[:2]
        x = self.backbone(image.flatten(0, 1)).unflatten(0, (b, length))  # pooled features [B, L, D]
        y = x + self.encode(x, real_frames(x, mask))  # residual fusion
        return {"output": self.head(self.dropout(y))}
