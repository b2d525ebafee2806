import pytest
import torch

from conftest import REPO
from fer_dist import config
from fer_dist.config import ConfigError, LossConfig
from fer_dist.models import build, create_model
from fer_dist.models.backbones import tokens
from fer_dist.models.losses import objective

TINY = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}


def tiny_model(**kw):
    return create_model(
        "mfm",
        image_size=32,
        audio_size=(64, 32),
        image_backbone_args=TINY,
        audio_backbone_args=TINY,
        fusion_heads=2,
        dropout=0.0,
        **kw,
    )


def test_heads_and_shapes():
    m = tiny_model()
    out = m(torch.randn(3, 3, 32, 32), torch.randn(3, 1, 64, 32))
    assert set(out) == {"image", "audio", "fusion", "ensemble"}
    assert all(v.shape == (3, 8) for v in out.values())
    probs = torch.stack([out[h].softmax(-1) for h in ("image", "audio", "fusion")]).mean(0)
    torch.testing.assert_close(out["ensemble"].exp(), probs)


def test_co_attention_directions():
    m = tiny_model().eval()
    ni, na, d = 4, 8, m.image_branch.num_features  # token counts differ, so directions are visible
    f_i, f_a = torch.randn(2, ni, d), torch.randn(2, na, d)
    y_ia, y_ai, w_ia, w_ai = m.co_attention(f_i, f_a)
    assert y_ia.shape == (2, na, d) and w_ia.shape == (2, na, ni)  # Eq. 1: audio queries image
    assert y_ai.shape == (2, ni, d) and w_ai.shape == (2, ni, na)  # Eq. 2: image queries audio
    # Eq. 1 averages image values: identical image tokens make Y_IA independent of the audio.
    same = f_i[:, :1].expand(-1, ni, -1)
    a = m.co_attention(same, f_a)[0]
    b = m.co_attention(same, torch.randn(2, na, d))[0]
    torch.testing.assert_close(a, b)
    # ...and Eq. 2 averages audio values: identical audio tokens make Y_AI independent of the image.
    same_a = f_a[:, :1].expand(-1, na, -1)
    torch.testing.assert_close(m.co_attention(f_i, same_a)[1], m.co_attention(torch.randn(2, ni, d), same_a)[1])


def test_token_sequences_not_pooled():
    m = tiny_model()
    # patch 4 then one patch merging: 32x32 -> 8x8 -> 4x4 tokens; 64x32 -> 16x8 -> 8x4
    assert tokens(m.image_branch, torch.randn(1, 3, 32, 32)).shape[1:] == (16, 32)
    assert tokens(m.audio_branch, torch.randn(1, 1, 64, 32)).shape[1:] == (32, 32)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    m = tiny_model()
    x = {"image": torch.randn(16, 3, 32, 32), "audio": torch.randn(16, 1, 64, 32)}
    y = torch.randint(0, 8, (16,))
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    losses = []
    for _ in range(15):
        loss = objective(m(**x), y, m.heads, LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_configs_build():
    for name in ("mfm_cpu.yaml", "mfm_swin_tiny.yaml"):
        cfg = config.load(REPO / "configs" / name, ["model.pretrained=false"])
        m = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
        assert m.output == "ensemble"
    paper = build(
        config.load(REPO / "configs" / "mfm_swin_tiny.yaml", ["model.pretrained=false"]).model, 224, [224, 224]
    )
    swin = sum(p.numel() for p in paper.image_branch.parameters())
    assert 27e6 < swin < 28.5e6  # Swin-Tiny without its head


NARROW_RESNET = {"channels": [8, 16, 16, 32], "stem_width": 8}
BACKBONES = {
    "cnn": ("resnet10t", NARROW_RESNET, 32),  # feature map 2x2 of a 64x64 input: 4 tokens of 32
    "swin": ("swin_tiny_patch4_window7_224", TINY, 32),
}


@pytest.mark.parametrize("image_kind", sorted(BACKBONES))
@pytest.mark.parametrize("audio_kind", sorted(BACKBONES))
def test_each_branch_takes_a_cnn_or_a_swin(image_kind, audio_kind):
    (image_name, image_args, image_dim), (audio_name, audio_args, audio_dim) = (
        BACKBONES[image_kind],
        BACKBONES[audio_kind],
    )
    m = create_model(
        "mfm",
        image_backbone=image_name,
        image_backbone_args=image_args,
        audio_backbone=audio_name,
        audio_backbone_args=audio_args,
        image_size=64,
        audio_size=(64, 32),
        fusion_dim=16,
        fusion_heads=2,
    )
    assert tokens(m.image_branch, torch.randn(2, 3, 64, 64)).shape[-1] == image_dim
    assert tokens(m.audio_branch, torch.randn(2, 1, 64, 32)).shape[-1] == audio_dim
    out = m(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 32))
    assert all(v.shape == (2, 8) for v in out.values())
    loss = objective(out, torch.tensor([1, 2]), m.heads, LossConfig())
    loss.backward()
    for branch in (m.image_branch, m.audio_branch):
        assert all(p.grad is not None for p in branch.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_backbone": "resnet_does_not_exist"}, "'resnet_does_not_exist' is not a timm model"),
        (
            {"audio_backbone": "resnet10t", "audio_backbone_args": {"embed_dim": 32}},
            "backbone 'resnet10t' cannot be built",
        ),
        (
            {"image_backbone_args": {**TINY, "num_heads": [1]}},
            "backbone 'swin_tiny_patch4_window7_224' cannot be built",
        ),
    ],
)
def test_a_backbone_that_cannot_work_is_a_config_error(kwargs, message):
    kwargs = {"image_backbone_args": TINY, "audio_backbone_args": TINY, **kwargs}
    with pytest.raises(ConfigError, match=message):
        create_model("mfm", image_size=32, audio_size=(32, 32), fusion_heads=2, **kwargs)


def test_head_weights_scale_each_heads_loss():
    outputs = {h: torch.randn(4, 8) for h in ("image", "audio", "fusion")}
    target = torch.tensor([0, 3, 5, 7])
    each = {h: objective(outputs, target, (h,), LossConfig()) for h in outputs}
    weighted = objective(outputs, target, tuple(outputs), LossConfig(head_weights={"fusion": 0.5, "image": 2.0}))
    torch.testing.assert_close(weighted, 2.0 * each["image"] + each["audio"] + 0.5 * each["fusion"])
