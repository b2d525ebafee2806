"""The run folder's contract: the layout it makes is the one run folders have always had (so
existing ones open), a cross-validation's folds are found in fold order, and a folder that is not a
finished run is refused in words."""

from __future__ import annotations

import json

import pytest
import yaml

from fer_dist.engine.rundir import CrossValidation, EnsembleDir, RunDir, RunError, is_result, runs_of


def old_run(path, epochs: int = 2, evaluated: int = 2, fold: int = 0) -> RunDir:
    """A run folder as fer-dist has written it: config, metrics lines, a step checkpoint, the best model."""
    (path / "checkpoints" / "best").mkdir(parents=True)
    (path / "checkpoints" / "step-00000120").mkdir()
    (path / "checkpoints" / "step-00000240.tmp").mkdir()  # being written: not a checkpoint yet
    config = {"data": {"holdout_fold": fold}, "train": {"epochs": epochs, "seed": 3}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({"epoch": e + 1, "macro_f1": 0.1 * (e + 1)}) for e in range(evaluated)]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (path / "checkpoints" / "best" / "metrics.json").write_text(json.dumps({"epoch": 1, "macro_f1": 0.1}))
    return RunDir(path)


def test_a_run_folder_written_before_the_contract_opens_with_it(tmp_path):
    run = old_run(tmp_path / "cv" / "fold2", fold=2)
    assert run.config.data.holdout_fold == 2 and run.config.train.seed == 3
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert [c.path.name for c in run.steps()] == ["step-00000120"] and run.latest() == run.step(120)
    assert run.holds_run() and run.finished()
    assert run.trained().metrics()["epoch"] == 1
    assert run.best_predictions() == tmp_path / "cv" / "fold2" / "predictions" / "epoch001.npz"
    assert run.name == "cv-fold2"
    # the paths of the layout the docs give (docs/training.md, The run directory)
    assert run.step(120).rng(1) == run.path / "checkpoints" / "step-00000120" / "rng-rank1.pt"
    assert run.best.weights == run.path / "checkpoints" / "best" / "model.safetensors"
    assert run.confusion(3) == run.path / "confusion" / "epoch003.png"
    assert (run.trackers.name, run.requeue.name, run.tensorboard.name) == (
        "trackers.json",
        "requeue.json",
        "tensorboard",
    )


def test_a_run_is_finished_only_when_its_last_epoch_was_evaluated_and_exported(tmp_path):
    assert not old_run(tmp_path / "a", epochs=3, evaluated=2).finished()  # killed after epoch 2 of 3
    run = RunDir(tmp_path / "b")
    assert not run.holds_run() and not run.finished()
    with pytest.raises(RunError, match="no finished training run there"):
        run.trained()
    with pytest.raises(RunError, match="no config.yaml there"):
        run.config  # noqa: B018 - reading it is the test


def test_the_folds_of_a_cross_validation_are_found_in_fold_order(tmp_path):
    cv = CrossValidation(tmp_path / "cv")
    for k in (10, 2, 0):
        old_run(cv.fold(k).path, fold=k)
    (cv.path / "fold_old").mkdir()  # not a fold's folder
    (cv.path / "fold5.txt").write_text("")  # nor this
    assert [r.path.name for r in cv.runs()] == ["fold0", "fold2", "fold10"]
    assert [r.config.data.holdout_fold for r in cv.runs()] == [0, 2, 10]
    (cv.path / "fold7").mkdir()  # a fold whose config is lost is still one of the folds, and refused when read
    assert [r.path.name for r in cv.runs()] == ["fold0", "fold2", "fold7", "fold10"]
    with pytest.raises(RunError, match="fold7: no config.yaml there"):
        cv.fold(7).config  # noqa: B018 - reading it is the test
    assert runs_of(cv.path) == cv.runs() and runs_of(cv.fold(2).path) == [cv.fold(2)]
    assert cv.ensemble.path == cv.path / "ensemble"
    out = EnsembleDir(tmp_path / "out")
    assert out.member_test(cv.fold(2)) == tmp_path / "out" / "test" / "cv-fold2.npz"


def test_a_result_folder_is_told_from_shards(tmp_path):
    run = old_run(tmp_path / "run")
    assert is_result(run.path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    assert not is_result(tmp_path / "shards")


def test_a_trained_model_loads_with_its_weights_ready_to_evaluate(shards, tmp_path):
    from safetensors.torch import save_file

    from fer_dist import config
    from fer_dist.data.shards.format import read_manifest
    from fer_dist.engine.rundir import TrainedModel
    from fer_dist.engine.task import model_for
    from helpers import REPO, tiny_run

    cfg = config.load(REPO / "configs" / "mfm_cpu.yaml", tiny_run(shards, tmp_path / "run"))
    trained = model_for(cfg, read_manifest(shards), training=False)
    best = TrainedModel(tmp_path / "best")
    best.path.mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(best.weights))
    best.config_file.write_text(config.dump(cfg))
    loaded = best.load(best.config(shards), read_manifest(shards))
    assert not loaded.training  # dropout off, as a user's own evaluation needs
    saved = trained.state_dict()
    assert all(v.equal(saved[k]) for k, v in loaded.state_dict().items()) and loaded.state_dict().keys() == saved.keys()
