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
        ("data.mix=cutmix", "data.mix must be one of none, mixup, remix, not .cutmix."),
        ("data.train_windows=[s, xl]", "data.train_windows must be one of s, m, l, not .xl."),
        ("train.mixed_precision=fp8", "train.mixed_precision must be one of auto, no, fp16, bf16"),
        ("data.crop_scale=[0.9, 0.5]", "data.crop_scale"),
        ("train.log_with=[tensorbord]", r"train.log_with: each tracker once, by one of Accelerate's names \(.*mlflow"),
        ("train.log_with=[mlflow, mlflow]", "each tracker once"),
        ("train.tracker_args={wandb: {mode: offline}}", "wandb not in train.log_with"),
        ("train.tensorboard=maybe", "train.tensorboard is replaced by train.log_with"),
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


def test_trackers_by_name_and_the_former_tensorboard_key(tmp_path):
    assert config.load(None).train.log_with == ["tensorboard"]
    cfg = config.load(None, ["train.log_with=[tensorboard, mlflow]", "train.tracker_args={mlflow: {tags: {a: b}}}"])
    assert cfg.train.log_with == ["tensorboard", "mlflow"] and cfg.train.tracker_args == {
        "mlflow": {"tags": {"a": "b"}}
    }
    # a run folder's config.yaml from before log_with still resumes: false meant no tracker
    old = tmp_path / "config.yaml"
    old.write_text("train: {tensorboard: false, epochs: 2}\n")
    assert config.load(old).train.log_with == []
    old.write_text("train: {tensorboard: true}\n")
    assert config.load(old).train.log_with == ["tensorboard"]
    assert "log_with:\n  - tensorboard" in config.dump(config.load(old)) and "tensorboard:" not in config.dump(cfg)
    with pytest.raises(config.ConfigError, match="replaced by train.log_with"):
        config.load(None, ["train.tensorboard=false", "train.log_with=[mlflow]"])


def test_a_tracker_that_is_not_installed_is_named_with_what_to_install(monkeypatch):
    import accelerate.tracking

    from fer_dist.engine import tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    assert tracking.installed(["tensorboard"]) == ["tensorboard"]
    with pytest.raises(
        config.ConfigError, match=r"mlflow, wandb not installed here \(pip install 'fer-dist\[mlflow\]' wandb\)"
    ):
        tracking.installed(["tensorboard", "mlflow", "wandb"])
