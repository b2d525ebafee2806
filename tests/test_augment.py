from types import SimpleNamespace

import torch

from fer_dist import config
from fer_dist.data.shards.format import MelStats
from fer_dist.data.shards.windows import SILENCE
from fer_dist.data.stream.transforms import mix, prepare, random_affine, remix_label_weight
from fer_dist.models.contract import IMAGENET

MANIFEST = SimpleNamespace(mel_stats=MelStats(0.0, 1.0), feature_stats={})  # what prepare() reads of a manifest


def data_cfg(*overrides):
    return config.load(None, ["data.image_size=32", "data.audio_size=[16, 16]", *overrides]).data


def batch_of(images, lead):
    """A decoded batch with these uint8 images [..., 3, 40, 40] and matching mel windows."""
    return {
        "image": images,
        "mel": torch.randn(*lead, 128, 64),
        "window": torch.tensor([0, 64]).expand(*lead, 2),
        "label": torch.zeros(lead, dtype=torch.long),
    }


def test_remix_label_rule():
    lam = torch.tensor([0.3, 0.3, 0.8, 0.8, 0.3, 0.6])
    n_i = torch.tensor([900.0, 900, 10, 10, 100, 10])
    n_j = torch.tensor([100.0, 600, 900, 100, 100, 900])
    got = remix_label_weight(lam, n_i, n_j, kappa=3, tau=0.5)
    # 0: i is the majority (ratio 9 >= kappa) and lambda < tau: the label is all y_j
    # 1: ratio 1.5 < kappa: the mixed label; 4: equal counts: the mixed label
    # 2, 3, 5: i is the minority (ratio <= 1/kappa) and 1 - lambda < tau: the label is all y_i
    torch.testing.assert_close(got, torch.tensor([0.0, 0.3, 1.0, 1.0, 0.3, 1.0]))
    torch.testing.assert_close(
        remix_label_weight(torch.tensor([0.6]), torch.tensor([900.0]), torch.tensor([100.0]), 3, 0.5),
        torch.tensor([0.6]),  # the majority sample dominates the mix: the label stays mixed
    )


def test_mixup_blends_inputs_and_labels_alike():
    torch.manual_seed(0)
    labels = torch.arange(8)
    inputs = {"image": labels.float().view(8, 1, 1, 1).expand(8, 3, 4, 4).clone(), "audio": labels.float()[:, None]}
    mixed, target = mix(inputs, labels, data_cfg("data.mix=mixup"), torch.ones(8), 8)
    assert target.shape == (8, 8)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    expected_value = (target * torch.arange(8.0)).sum(1)  # lambda y_i + (1 - lambda) y_j
    torch.testing.assert_close(mixed["image"][:, 0, 0, 0], expected_value)
    torch.testing.assert_close(mixed["audio"][:, 0], expected_value)


def test_remix_moves_the_label_to_the_minority():
    torch.manual_seed(1)
    counts = torch.tensor([1000.0, 10, 10, 10, 10, 10, 10, 10])
    labels = torch.tensor([0, 1] * 64)
    inputs = {"image": (labels == 1).float().view(128, 1, 1, 1).expand(128, 3, 2, 2).clone()}
    mixed, target = mix(inputs, labels, data_cfg("data.mix=remix"), counts, 8)
    majority = labels == 0
    image_share = mixed["image"][majority, 0, 0, 0]  # how much of the minority image is in the mix
    label_share = target[majority, 1]
    partnered = image_share > 0
    minority_heavy = partnered & (image_share > 0.5)  # lambda < tau: the label goes to the minority
    assert minority_heavy.any() and (partnered & ~minority_heavy).any()
    torch.testing.assert_close(label_share[minority_heavy], torch.ones(int(minority_heavy.sum())))
    torch.testing.assert_close(label_share[partnered & ~minority_heavy], image_share[partnered & ~minority_heavy])


def test_geometric_augmentation_is_identity_when_disabled():
    cfg = data_cfg("data.rotation=0", "data.crop_scale=[1, 1]", "data.hflip=false")
    theta = random_affine(5, cfg, torch.device("cpu"))
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(5, 2, 3))


def test_augmentation_is_per_run_in_clip_mode():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    images = frame.expand(2, 4, 3, 40, 40).clone()  # two runs of four identical frames
    cfg = data_cfg("data.rotation=20", "data.color_jitter=0.3")
    out = prepare(batch_of(images, (2, 4)), torch.device("cpu"), cfg, MANIFEST, train=True, normalisation=IMAGENET)
    assert out["image"].shape == (2, 4, 3, 32, 32) and out["audio"].shape == (2, 4, 1, 16, 16)
    for run in out["image"]:
        torch.testing.assert_close(run, run[:1].expand_as(run))  # one augmentation per run
    assert not torch.allclose(out["image"][0], out["image"][1])  # runs differ
    plain = prepare(batch_of(images, (2, 4)), torch.device("cpu"), cfg, MANIFEST, train=False, normalisation=IMAGENET)
    torch.testing.assert_close(plain["image"][0], plain["image"][1])  # evaluation: no augmentation


def test_audio_dropout_silences_whole_runs_in_training_only():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 4, 3, 40, 40), dtype=torch.uint8)
    batch = batch_of(images, (64, 4))

    def audio(dropout: float, train: bool) -> torch.Tensor:
        cfg = data_cfg(f"data.audio_dropout={dropout}")
        return prepare(batch, torch.device("cpu"), cfg, MANIFEST, train, IMAGENET)["audio"]

    out = audio(0.5, True)
    silent = (out == SILENCE).flatten(2).all(-1)  # [runs, frames]: the window is silence throughout
    assert (silent == silent[:, :1]).all()  # a run is silent as a whole or not at all
    assert 10 < silent[:, 0].sum() < 54  # about half of the 64 runs
    heard = ~silent[:, 0]
    plain = prepare(batch, torch.device("cpu"), data_cfg(), MANIFEST, True, IMAGENET)["audio"]
    torch.testing.assert_close(out[heard], plain[heard])  # the others are untouched
    never, evaluated = audio(0.0, True), audio(0.5, False)
    for kept in (never, evaluated):
        assert not (kept == SILENCE).flatten(2).all(-1).any()
