"""The models: the fusion model's heads and attention, any timm backbone in its branches, the
contract every model declares, and the parts of the papers' models and losses that the papers
define exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fer_dist import config
from fer_dist.config import CONFIGS, ConfigError, LossConfig
from fer_dist.engine.losses import consistency, focal, objective, symmetric_kl
from fer_dist.engine.task import ensembled, width
from fer_dist.models import build, create_model
from fer_dist.models.backbones import tokens
from fer_dist.models.regnet_transformer import RegNetTransformer
from helpers import REPO, TINY, tiny_mfm


def tiny_model(**kw):
    return tiny_mfm(audio_size=(64, 32), dropout=0.0, **kw)


def test_heads_and_shapes():
    m = tiny_model()
    out = m(torch.randn(3, 3, 32, 32), torch.randn(3, 1, 64, 32))
    assert set(out) == {"image", "audio", "fusion"} and m.output == "ensemble" and m.ensemble == m.heads
    assert all(v.shape == (3, 8) for v in out.values())
    probs = torch.stack([out[h].softmax(-1) for h in ("image", "audio", "fusion")]).mean(0)
    torch.testing.assert_close(ensembled(out, m.ensemble, ["expr"]).exp(), probs)


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


def test_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    p = logits.softmax(-1)
    by_hand = [-0.9 * (1 - float(p[i, t])) ** 2 * math.log(p[i, t]) for i, t in enumerate(target.tolist())]
    q = F.one_hot(target, 3).float()
    assert focal(logits, q, alpha=0.9, gamma=2.0).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    # gamma = 0, alpha = 1 is cross-entropy
    assert focal(logits, q, 1.0, 0.0).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


def test_rdrop_loss_by_hand():
    """Paper 004, Eq. 4: the mean of the two cross-entropies plus alpha times the symmetric KL."""
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    pa, pb = a.softmax(-1)[0].tolist(), b.softmax(-1)[0].tolist()
    kl_ab = sum(pa[c] * math.log(pa[c] / pb[c]) for c in range(3))
    kl_ba = sum(pb[c] * math.log(pb[c] / pa[c]) for c in range(3))
    assert symmetric_kl(a, b).item() == pytest.approx(0.5 * (kl_ab + kl_ba), rel=1e-6)
    target = torch.tensor([0])
    cfg = LossConfig(rdrop_alpha=5.0)
    ce = 0.5 * (-math.log(pa[0]) - math.log(pb[0]))
    got = objective({"expr": a}, target, ("expr",), cfg, again={"expr": b})
    assert got.item() == pytest.approx(ce + 5.0 * 0.5 * (kl_ab + kl_ba), rel=1e-6)


def test_rdrop_terms_of_action_units_and_valence_arousal_are_on_their_losses_scale():
    """Each AU's symmetric Bernoulli KL, averaged over the AUs as their binary cross-entropy is (summed,
    12 AUs would weigh twelve times what they weigh for expressions); the squared difference of the
    values, averaged over valence and arousal as 1 - CCC is."""
    a = torch.tensor([[2.0, -1.0] * 6, [0.5, 0.0] * 6])
    b = torch.tensor([[-1.0, 1.0] * 6, [0.5, 3.0] * 6])

    def bernoulli_kl(p: float, q: float) -> float:
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    pa, pb = torch.sigmoid(a).tolist(), torch.sigmoid(b).tolist()
    by_hand = [
        sum(0.5 * (bernoulli_kl(x, y) + bernoulli_kl(y, x)) for x, y in zip(ra, rb, strict=True)) / 12
        for ra, rb in zip(pa, pb, strict=True)
    ]
    assert consistency("au", a, b).item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert consistency("au", a[:, :2], b[:, :2]).item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    va_a, va_b = torch.tensor([[0.3, -0.2], [1.0, 0.0]]), torch.tensor([[0.0, 0.2], [0.0, 0.5]])
    diffs = (torch.tanh(va_a) - torch.tanh(va_b)).tolist()
    assert consistency("va", va_a, va_b).item() == pytest.approx(sum(d * d for r in diffs for d in r) / 4, rel=1e-5)


def test_cross_entropy_weights_smoothing_and_mask():
    logits = torch.randn(2, 3, 8)
    target = torch.randint(0, 8, (2, 3))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    weights = [1.0, 2, 3, 4, 5, 6, 7, 8]
    got = objective({"h": logits}, target, ("h",), LossConfig(class_weights=weights), mask)
    want = F.cross_entropy(logits[mask], target[mask], weight=torch.tensor(weights))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got = objective({"h": logits}, target, ("h",), LossConfig(label_smoothing=0.1), mask)
    want = F.cross_entropy(logits[mask], target[mask], label_smoothing=0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def tiny_regnet(**kw) -> RegNetTransformer:
    torch.manual_seed(0)
    return create_model("regnet_transformer", backbone="regnety_002", **kw).eval()


def test_regnet_transformer_residual_fusion():
    """Paper 003: y = x + F(x). With the encoder's last block ending in zeros, y is the backbone feature."""
    model = tiny_regnet()
    image = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        last = model.encoder[-1].norm2
        last.weight.zero_()
        last.bias.zero_()
        x = model.backbone(image.flatten(0, 1)).unflatten(0, (2, 4))
        assert torch.allclose(model(image)["output"], model.head(x), atol=1e-6)


def test_regnet_transformer_attends_across_the_run_not_its_padding():
    model = tiny_regnet()
    assert len(model.encoder) == 1 and model.encoder[0].heads == 2 and model.encoder[0].head_dim == 64
    assert model.encoder[0].ff[0].out_features == 512
    length = 64  # the paper's sequence
    image = torch.randn(1, length, 3, 32, 32)
    mask = torch.ones(1, length, dtype=torch.bool)
    mask[0, 40:] = False
    with torch.no_grad():
        base = model(image, mask)["output"]
        changed = image.clone()
        changed[0, 39] += 1  # the last real frame
        assert not torch.allclose(model(changed, mask)["output"][0, 0], base[0, 0])
        padding = image.clone()
        padding[0, 50] += 1  # a padded frame
        assert torch.allclose(model(padding, mask)["output"][0, :40], base[0, :40], atol=1e-5)


def test_lstm_carries_its_state_across_segments():
    """Paper 004, Eq. 2: segment i starts from segment i - 1's last state (stride = length)."""
    torch.manual_seed(0)
    model = create_model(
        "feature_lstm", embedding_dim=6, audio_features_dim=3, affine_dim=16, hidden=8, segment=4, head_dims=[8]
    )
    emb = torch.randn(2, 12, 6, requires_grad=True)
    aud = torch.randn(2, 12, 3)
    f = model.affine(torch.cat([emb, aud], -1))
    whole, _ = model.lstm(f)  # one pass over the three segments
    carried = model.encode(f, torch.ones(2, 12, dtype=torch.bool))
    assert torch.allclose(carried, whole, atol=1e-6)
    cold, _ = model.lstm(f[:, 4:8])  # segment 2 without the carried state differs
    assert not torch.allclose(carried[:, 4:8], cold, atol=1e-4)
    # the carried state is a value: segment 2's loss does not reach segment 1's inputs
    grad = torch.autograd.grad(carried[:, 4:8].sum(), emb)[0]
    assert grad[:, :4].abs().max() == 0 and grad[:, 4:8].abs().max() > 0


def test_feature_transformer_keeps_segments_apart():
    torch.manual_seed(0)
    model = create_model(
        "feature_transformer",
        embedding_dim=6,
        audio_features_dim=3,
        affine_dim=16,
        layers=1,
        num_heads=4,
        ff_dim=32,
        segment=4,
        head_dims=[8],
    ).eval()
    emb, aud = torch.randn(1, 8, 6), torch.randn(1, 8, 3)
    with torch.no_grad():
        base = model(emb, aud)["output"]
        emb2 = emb.clone()
        emb2[0, 5] += 1  # a frame of the second segment
        out = model(emb2, aud)["output"]
    assert torch.allclose(out[0, :4], base[0, :4], atol=1e-6)
    assert not torch.allclose(out[0, 4:], base[0, 4:])


def test_decoder_fusion_takes_the_static_feature_as_keys_and_values():
    """Paper 001: the decoder's second attention has Q from the sequence, K = V = h_s."""
    torch.manual_seed(0)
    model = create_model(
        "decoder_fusion",
        embedding_dim=6,
        audio_features_dim=3,
        static_backbone="resnet10t",
        context=3,
        dim=16,
        decoder_heads=2,
        mlp_dims=[16],
    ).eval()
    image, emb, aud = torch.randn(1, 5, 3, 32, 32), torch.randn(1, 5, 6), torch.randn(1, 5, 3)
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("calls", []).append((args, kwargs))

    attention = model.decoder["embedding"].layers[0].multihead_attn
    hook = attention.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(image, emb, aud)
        memory, _ = model.static_feature(image.flatten(0, 1))
    hook.remove()
    (query, key, value), _ = seen["calls"][0]
    assert torch.equal(key, memory) and torch.equal(value, memory)
    assert query.shape[:2] == (5, 2 * 3 + 1)  # every frame's +-3 neighbourhood asks h_s
    assert model.inputs == ("image", "embedding", "audio_features")


def test_decoder_fusion_words_are_optional():
    model = build(
        {"name": "decoder_fusion", "static_backbone": "resnet10t", "dim": 16, "decoder_heads": 2},
        64,
        [64, 64],
        {"embedding_dim": 6, "audio_features_dim": 3, "words_dim": 5},
    )
    assert model.inputs == ("image", "embedding", "audio_features", "words") and "words" in model.gru
    out = model(torch.randn(1, 3, 3, 32, 32), torch.randn(1, 3, 6), torch.randn(1, 3, 3), torch.randn(1, 3, 5))
    assert out["output"].shape == (1, 3, 8)


def test_feature_models_need_feature_shards():
    from fer_dist.config import ConfigError

    with pytest.raises(ConfigError, match="fer-dist extract"):
        build({"name": "feature_lstm"}, 64, [64, 64])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_builds_its_model(name):
    cfg = config.load(CONFIGS / name)
    local = {"pretrained": False, "speech_weights": None}  # the shipped configs' weights files are the user's
    model_cfg = {**cfg.model, **{k: v for k, v in local.items() if k in cfg.model}}
    features = {"embedding_dim": 512, "audio_features_dim": 15, "voice_dim": 768, "voice_layers": 13}
    model = build(model_cfg, cfg.data.image_size, cfg.data.audio_size, features, width(cfg.tracks))
    assert model.sequences == bool(cfg.data.sequence_length)
    assert model.output in (*model.heads, "ensemble")


@pytest.mark.parametrize(
    ("backbone", "args", "mean", "std"),
    [
        ("vit_tiny_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2}, (0.5,) * 3, (0.5,) * 3),
        ("resnet10t", {"channels": [8, 8, 8, 8], "stem_width": 8}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_image_inputs_are_normalised_as_the_backbone_was_pretrained(backbone, args, mean, std):
    """timm configures a ViT (and paper 001's inception_resnet_v2) with mean and std 0.5, a ResNet
    with ImageNet's: the model declares it, and the batch preparation of training and evaluation
    standardises the crops with it."""
    from types import SimpleNamespace

    from fer_dist.engine.task import Task

    model = tiny_mfm(image_backbone=backbone, image_backbone_args=args)
    assert model.image_normalisation == (mean, std)
    cfg = config.load(None, ["data.image_size=32"])
    shards = SimpleNamespace(mel_stats=None, feature_stats={})
    crops = torch.full((2, 3, 32, 32), 191, dtype=torch.uint8)  # 0.749 of full scale in every channel
    image = Task(cfg, shards, model).prepare({"image": crops, "label": torch.tensor([0, 1])}, "cpu", False).inputs
    expected = (191 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(image["image"][:, :, 5, 7], expected.expand(2, 3))
