"""The Modal Fusion Module network of paper 000 (Multi Modal Facial Expression Recognition with
Transformer-Based Fusion Networks and Dynamic Sampling).

An image branch and an audio branch (Swin Transformers) give token sequences f_I and f_A. The
MFM fuses them by co-attention in both directions,

    Y_IA = Attention(Q=f_A, K=f_I, V=f_I)     (Eq. 1: audio asks the image)
    Y_AI = Attention(Q=f_I, K=f_A, V=f_A)     (Eq. 2: the image asks the audio)
    Y    = Concat(Y_IA, Y_AI)                 (Eq. 3, along the token axis)

then two ViT encoder layers give Y_T. Linear heads on the pooled branch features give Y_I and Y_A;
the prediction is the ensemble (mean probability) of Y_I, Y_A and Y_T, and all three are trained
(the engine averages them per track: `ExpressionModel.ensemble`).

The paper trains the branches first, then the fusion: `stage="image"` or `"audio"` builds one
branch and its head alone; `stage="fusion"` (the default) builds everything, and takes the
branches' weights through `train.init_from`.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_dist.config import ConfigError
from fer_dist.models.backbones import create_backbone, tokens
from fer_dist.models.contract import ExpressionModel, normalisation_of

STAGES = {"image": ("image",), "audio": ("audio",), "fusion": ("image", "audio", "fusion")}


class ModalFusionNet(ExpressionModel):
    def __init__(
        self,
        image_backbone: str = "swin_tiny_patch4_window7_224",
        audio_backbone: str = "swin_tiny_patch4_window7_224",
        image_size: int = 224,
        audio_size: tuple[int, int] = (224, 224),
        image_backbone_args: dict | None = None,
        audio_backbone_args: dict | None = None,
        pretrained: bool | str = False,
        fusion_dim: int | None = None,
        fusion_heads: int = 8,
        fusion_layers: int = 2,
        dropout: float = 0.1,
        outputs: int = 8,
        stage: str = "fusion",
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ConfigError(f"model.stage must be one of {', '.join(STAGES)}, not {stage!r}")
        self.heads = STAGES[stage]  # trained heads
        self.inputs = ("image", "audio") if stage == "fusion" else (stage,)
        self.output = "ensemble" if stage == "fusion" else stage  # the model's prediction
        self.ensemble = self.heads if stage == "fusion" else ()
        if stage != "audio":
            self.image_branch = create_backbone(
                image_backbone, in_chans=3, img_size=image_size, pretrained=pretrained, **(image_backbone_args or {})
            )
            self.image_normalisation = normalisation_of(self.image_branch)
        if stage != "image":
            self.audio_branch = create_backbone(
                audio_backbone,
                in_chans=1,
                img_size=tuple(audio_size),
                pretrained=pretrained,
                **(audio_backbone_args or {}),
            )
        if stage == "fusion":
            di, da = self.image_branch.num_features, self.audio_branch.num_features
            dim = fusion_dim or di
            self.image_proj = nn.Identity() if di == dim else nn.Linear(di, dim)
            self.audio_proj = nn.Identity() if da == dim else nn.Linear(da, dim)
            self.audio_asks_image = nn.MultiheadAttention(dim, fusion_heads, dropout=dropout, batch_first=True)
            self.image_asks_audio = nn.MultiheadAttention(dim, fusion_heads, dropout=dropout, batch_first=True)
            self.source = nn.Parameter(torch.zeros(2, dim))  # tells the encoder which half a token came from
            layer = nn.TransformerEncoderLayer(
                dim, fusion_heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(
                layer, fusion_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
            )
        if stage != "audio":
            self.image_head = nn.Linear(self.image_branch.num_features, outputs)
        if stage != "image":
            self.audio_head = nn.Linear(self.audio_branch.num_features, outputs)
        if stage == "fusion":
            self.fusion_head = nn.Linear(dim, outputs)
            nn.init.trunc_normal_(self.source, std=0.02)

    def co_attention(self, f_i: torch.Tensor, f_a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Eq. 1-2: returns Y_IA [B, Na, D], Y_AI [B, Ni, D] and their weights [B, Na, Ni], [B, Ni, Na]."""
        y_ia, w_ia = self.audio_asks_image(f_a, f_i, f_i)
        y_ai, w_ai = self.image_asks_audio(f_i, f_a, f_a)
        return y_ia, y_ai, w_ia, w_ai

    def forward(self, image: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.output == "image":
            return {"image": self.image_head(tokens(self.image_branch, image).mean(1))}
        if self.output == "audio":
            return {"audio": self.audio_head(tokens(self.audio_branch, audio).mean(1))}
        f_i = tokens(self.image_branch, image)
        f_a = tokens(self.audio_branch, audio)
        y_ia, y_ai, _, _ = self.co_attention(self.image_proj(f_i), self.audio_proj(f_a))
        y = torch.cat([y_ia + self.source[0], y_ai + self.source[1]], dim=1)  # Eq. 3
        y_t = self.encoder(y).mean(1)
        return {
            "image": self.image_head(f_i.mean(1)),
            "audio": self.audio_head(f_a.mean(1)),
            "fusion": self.fusion_head(y_t),
        }
