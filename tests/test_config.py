import pytest

from fer_dist import config


def test_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {batch_size: 8}\ntrain: {epochs: 2}\n")
    cfg = config.load(f, ["data.batch_size=16", "optim.lr=0.01", "data.audio_size=[32, 16]", "model.fusion_dim=64"])
    assert cfg.data.batch_size == 16 and cfg.optim.lr == 0.01 and cfg.data.audio_size == [32, 16]
    assert cfg.model == {"name": "mfm", "fusion_dim": 64}
    assert cfg.train.epochs == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batchsize=3", r"unknown key\(s\) data.batchsize"),
        ("data.batch_size=many", "data.batch_size: expected int"),
        ("data.balance=wrong", "data.balance must be"),
        ("opt.lr=1", r"unknown section\(s\) opt"),
        ("train.epochs", "not key=value"),
        ("data.balance=weights", "needs data.class_weights: 8"),
        ("data.video_cap=[50, 200]", "data.video_cap: empty or 8 counts, one per class in the order Neutral, Anger"),
        ("data.subsample=[1, 1, 1, 1, 0, 1, 1, 1]", r"data.subsample: empty or 8 in \(0, 1\]"),
        ("data.mix=cutmix", "data.mix must be none, mixup or remix"),
        ("data.crop_scale=[0.9, 0.5]", "data.crop_scale"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, [override])


def test_yaml_is_not_executed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        config.load(f)


def test_fer_dist_train_passes_its_options_to_the_loop(tmp_path, capsys):
    """`fer-dist train --config X` reaches train.py's own parser, which names the missing file."""
    from fer_dist.cli import main

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
