"""The recipe's model: modality dropout, the temporal models' masking, face encoders from local files."""

import pytest
import torch
from safetensors.torch import save_file

from fer_dist.models import build
from fer_dist.models.recipe import Temporal, drop_modalities

SMALL = {
    "name": "face_voice_temporal",
    "image_backbone": "resnet10t",
    "image_backbone_args": {"channels": [8, 16, 32, 64], "stem_width": 8},
    "speech_encoder": "wav2vec2_tiny",
    "dim": 32,
    "num_heads": 2,
    "temporal_layers": 1,
}


def inputs(runs: int = 2, length: int = 3, size: int = 32) -> dict:
    torch.manual_seed(0)
    mask = torch.ones(runs, length, dtype=torch.bool)
    mask[1, -1] = False
    return {
        "image": torch.randn(runs, length, 3, size, size),
        "wave": torch.randn(runs, length, 17066) * 0.1,
        "wave_lengths": torch.full((runs, length), 17066),
        "mask": mask,
    }


def test_modality_dropout_replaces_one_whole_modality_of_a_run():
    torch.manual_seed(0)
    v, a, missing = torch.randn(400, 3, 4), torch.randn(400, 3, 4), torch.randn(2, 4)
    dv, da = drop_modalities(v, a, missing, 1.0)
    face = (dv == missing[0]).all(-1).all(-1)
    voice = (da == missing[1]).all(-1).all(-1)
    assert torch.equal(face, ~voice)  # every run loses exactly one modality, whole
    assert torch.equal(dv[~face], v[~face]) and torch.equal(da[~voice], a[~voice])
    assert 150 < int(face.sum()) < 250  # either, equally likely
    kept = drop_modalities(v, a, missing, 0.0)
    assert torch.equal(kept[0], v) and torch.equal(kept[1], a)


@pytest.mark.parametrize("kind", ["transformer", "tcn"])
def test_the_temporal_model_never_lets_padding_reach_a_real_frame(kind):
    torch.manual_seed(0)
    temporal = Temporal(kind, 16, 2, 2, 0.0).eval()
    x = torch.randn(2, 6, 16)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    other = x.clone()
    other[1, 4:] = torch.randn(2, 16) * 100
    torch.testing.assert_close(temporal(x, keep)[keep], temporal(other, keep)[keep])
    shifted = x.clone()
    shifted[1, 1] = torch.randn(16)  # a real neighbour does reach it
    assert not torch.allclose(temporal(x, keep)[1, 0], temporal(shifted, keep)[1, 0])


@pytest.mark.parametrize("fusion", ["gated", "cross"])
def test_the_model_scores_every_frame_with_each_head(fusion):
    model = build({**SMALL, "fusion": fusion, "modality_dropout": 1.0}, 32, [64, 64])
    assert model.inputs == ("image", "wave") and model.sequences
    out = model.eval()(**inputs())
    assert set(out) == {"image", "audio", "fusion"} and all(v.shape == (2, 3, 8) for v in out.values())
    model.train()(**inputs())["fusion"].sum().backward()
    assert model.missing.grad.abs().sum() > 0  # every run lost a modality to its stand-in


def test_frozen_encoders_stay_frozen_and_in_eval_mode():
    model = build({**SMALL, "train_image": False, "train_speech": False}, 32, [64, 64]).train()
    out = model(**inputs())
    sum(v.sum() for v in out.values()).backward()
    assert not model.face.training and not model.voice.model.training
    assert all(p.grad is None for p in [*model.face.parameters(), *model.voice.model.parameters()])
    assert model.voice.layer_weights.grad is not None and model.face_proj[1].weight.grad is not None


@pytest.mark.parametrize(
    ("backbone", "mean"),
    [("vit_small_patch14_dinov2.lvd142m", (0.485, 0.456, 0.406)), ("vit_base_patch16_224.mae", (0.485, 0.456, 0.406))],
)
def test_a_pretrained_vit_loads_from_a_local_file_and_sets_the_normalisation(tmp_path, backbone, mean):
    """MAE and DINOv2 ViTs (one block here), weights from a local safetensors file; the inputs are
    standardised as the weights' pretrained config says."""
    size = 28 if "patch14" in backbone else 32
    config = {**SMALL, "image_backbone": backbone, "image_backbone_args": {"depth": 1}}
    torch.manual_seed(0)
    source = build(config, size, [64, 64])
    save_file({k: v.contiguous() for k, v in source.face.state_dict().items()}, tmp_path / "face.safetensors")
    torch.manual_seed(1)
    loaded = build({**config, "pretrained": str(tmp_path / "face.safetensors")}, size, [64, 64])
    assert all(torch.equal(v, source.face.state_dict()[k]) for k, v in loaded.face.state_dict().items())
    assert loaded.image_normalisation[0] == pytest.approx(mean)
    out = loaded.eval()(**inputs(size=size))
    assert out["fusion"].shape == (2, 3, 8)


def test_the_recipe_on_shards_without_waveforms_is_a_config_error(shards):
    from fer_dist import config
    from fer_dist.config import ConfigError
    from fer_dist.data.shards.format import read_manifest
    from fer_dist.data.stream import pipeline

    cfg = config.load(None, [f"data.shards={shards}", "data.sequence_length=4"]).data
    with pytest.raises(ConfigError, match="fer-dist shard --audio-wave"):
        pipeline.check(cfg, read_manifest(shards), ("image", "wave"))


def test_on_feature_shards_the_recipe_is_the_same_model_after_its_encoders():
    """`face_voice_temporal_features` takes what the frozen encoders give (the face embedding and
    the voice's layer averages) and scores it as the end-to-end model scores its encoders' outputs."""
    end_to_end = build({**SMALL, "train_image": False}, 32, [64, 64]).eval()
    with torch.no_grad():
        end_to_end.voice.layer_weights.copy_(torch.tensor([0.5, -1.0]))
    x = inputs()
    with torch.no_grad():
        face = end_to_end.face.forward_head(end_to_end.face.forward_features(x["image"].flatten(0, 1)), pre_logits=True)
        face = face.unflatten(0, (2, 3))
        voice = end_to_end.voice.layer_means(x["wave"].flatten(0, 1), x["wave_lengths"].flatten()).unflatten(0, (2, 3))
    features = {"embedding_dim": face.shape[-1], "voice_dim": voice.shape[-1], "voice_layers": voice.shape[-2]}
    on_features = build(
        {"name": "face_voice_temporal_features", "dim": 32, "num_heads": 2, "temporal_layers": 1},
        32,
        [64, 64],
        features,
    ).eval()
    trunk = {k: v for k, v in end_to_end.state_dict().items() if not k.startswith(("face.", "voice."))}
    on_features.load_state_dict({**trunk, "layer_weights": end_to_end.voice.layer_weights.detach()})
    assert on_features.inputs == ("embedding", "voice") and on_features.sequences
    with torch.no_grad():
        want, got = end_to_end(**x), on_features(embedding=face, voice=voice, mask=x["mask"])
    for head in ("image", "audio", "fusion"):
        torch.testing.assert_close(got[head], want[head], rtol=1e-4, atol=1e-5)
