"""Ensembles, post-processing and submissions against hand-built predictions and label sequences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_dist.engine import predictions as preds_lib
from fer_dist.engine.rundir import RunDir
from fer_dist.labels import CLASSES, NUM_CLASSES
from fer_dist.results import ensemble, postprocess, submission


def onehot_logits(labels, strength=5.0) -> np.ndarray:
    return np.eye(8)[labels] * strength


def test_filter_replaces_short_runs_by_their_neighbourhood():
    t = (3,) * 8
    n = (2,) * 8
    labels = np.array([0, 0, 0, 0, 2, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert postprocess.filter_runs(labels, t, n).tolist() == [0] * 8 + [1] * 6
    # runs at least as long as their class's threshold stay
    assert postprocess.filter_runs(np.array([0, 0, 0, 2, 2, 2, 0, 0, 0]), t, n).tolist() == [0, 0, 0, 2, 2, 2, 0, 0, 0]
    # class-specific: the same two-frame run is kept for a class with threshold 2, replaced for threshold 3
    seq = np.array([0, 0, 0, 5, 5, 0, 0, 0])
    assert postprocess.filter_runs(seq, (3, 3, 3, 3, 3, 2, 3, 3), n).tolist() == seq.tolist()
    assert postprocess.filter_runs(seq, t, n).tolist() == [0] * 8
    # the neighbourhood length decides: 1 frame each side sees 4 and 6 (tie: lower class), 3 frames see 6,6,6
    seq = np.array([6, 6, 4, 7, 6, 6, 6])
    assert postprocess.filter_runs(seq, t, (1,) * 8)[3] == 4
    assert postprocess.filter_runs(seq, t, (3,) * 8)[3] == 6
    # every run is judged on the input: two adjacent glitches both take the surrounding label
    assert postprocess.filter_runs(np.array([1, 1, 1, 3, 4, 1, 1, 1]), t, n).tolist() == [1] * 8


def test_moving_average_is_per_video_and_centred():
    probs = np.zeros((6, 8))
    probs[[0, 1, 2], 0] = 1
    probs[[3, 4, 5], 1] = 1
    smooth = postprocess.moving_average(probs, 3)
    assert smooth[1, 0] == pytest.approx(1.0)
    assert smooth[2].tolist()[:2] == pytest.approx([2 / 3, 1 / 3])
    assert smooth[0, 0] == pytest.approx(1.0)  # shrinks at the edge: mean of rows 0 and 1
    keys = np.array(["a/00001", "a/00002", "a/00003", "b/00001", "b/00002", "b/00003"])
    labels = postprocess.apply(keys, probs, postprocess.PostParams(window=5))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # video a's rows never smooth video b's


def test_tuning_on_validation_removes_glitches():
    rng = np.random.default_rng(0)
    truth = np.repeat(rng.permutation(np.tile(np.arange(8), 3)), 40)
    noisy = truth.copy()
    flip = rng.random(len(truth)) < 0.15
    noisy[flip] = rng.integers(0, 8, flip.sum())
    keys = np.array([f"v/{i + 1:05d}" for i in range(len(truth))])
    params, before, after = postprocess.tune(keys, onehot_logits(noisy) / 5, truth)
    assert after > before + 0.05
    assert postprocess.PostParams.from_dict(params.to_dict()) == params
    assert (params.window, max(params.thresholds)) != (1, 0)


def test_mean_and_vote_by_hand():
    a = np.array([[0.6, 0.4, 0, 0, 0, 0, 0, 0], [0.2, 0.8, 0, 0, 0, 0, 0, 0]])
    b = np.array([[0.45, 0.55, 0, 0, 0, 0, 0, 0], [0.3, 0.7, 0, 0, 0, 0, 0, 0]])
    c = np.array([[0.45, 0.55, 0, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0, 0, 0]])
    mean = ensemble.combine([a, b, c], "mean")
    assert mean[0, :2] == pytest.approx([0.5, 0.5])
    assert mean[1, :2] == pytest.approx([1.4 / 3, 1.6 / 3])
    vote = ensemble.combine([a, b, c], "vote")
    assert vote.argmax(1).tolist() == [1, 1]  # two votes each for class 1
    assert vote.sum(1) == pytest.approx([1, 1])
    # a tie of votes goes to the higher mean probability
    d = np.array([[0.1, 0.0, 0.9, 0, 0, 0, 0, 0], [0.5, 0.0, 0.5, 0, 0, 0, 0, 0]])
    tie = ensemble.combine([a, d], "vote")
    assert tie.argmax(1).tolist() == [2, 1]
    with pytest.raises(ensemble.EnsembleError, match="--how"):
        ensemble.combine([a], "max")


def test_members_must_predict_the_same_frames():
    keys = np.array(["v/00001", "v/00002"])
    p = preds_lib.Predictions(keys, np.zeros(2, int), {"expr": np.zeros((2, 8))}, "expr")
    q = preds_lib.Predictions(keys[:1], np.zeros(1, int), {"expr": np.zeros((1, 8))}, "expr")
    with pytest.raises(ensemble.EnsembleError, match="1 missing.*v/00002"):
        ensemble.aligned({"p": p, "q": q})


def fake_fold(cv, k: int, keys, labels, predicted, test_keys, test_predicted) -> None:
    """A finished fold run: its config, best epoch and that epoch's predictions; plus test predictions."""
    run = cv / f"fold{k}"
    (run / "checkpoints" / "best").mkdir(parents=True)
    config = {"data": {"holdout_fold": k, "shards": str(cv / "shards")}, "train": {"seed": 10 + k}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoints" / "best" / "metrics.json").write_text(json.dumps({"epoch": 2}))
    (run / "predictions").mkdir()
    logits = {"expr": onehot_logits(predicted), "aux": onehot_logits(np.zeros_like(predicted))}
    preds_lib.save(run / "predictions" / "epoch002.npz", preds_lib.Predictions(keys, labels, logits, "expr"))
    test = cv / "ensemble" / "test"
    test.mkdir(parents=True, exist_ok=True)
    tl = {"expr": onehot_logits(test_predicted), "aux": onehot_logits(np.zeros_like(test_predicted))}
    unlabelled = -np.ones(len(test_keys), int)
    preds_lib.save(test / f"cv-fold{k}.npz", preds_lib.Predictions(test_keys, unlabelled, tl, "expr"))


def test_ensemble_report_from_fold_runs(tmp_path):
    """Three folds, each right on its own videos for different classes; the test truth is 0..7 in
    runs of 4 and each fold is wrong on a different third of it, so the vote is always right."""
    cv = tmp_path / "cv"
    truth = np.repeat(np.arange(8), 4)
    test_keys = np.array([f"t/{i + 1:05d}" for i in range(32)])
    for k in range(3):
        keys = np.array([f"v{k}/{i + 1:05d}" for i in range(8)])
        labels = np.arange(8)
        predicted = labels.copy()
        predicted[k] = (k + 1) % 8  # one mistake per fold
        wrong = truth.copy()
        wrong[k::3] = (wrong[k::3] + 1) % 8
        fake_fold(cv, k, keys, labels, predicted, test_keys, wrong)
    labels_dir = tmp_path / "truth"
    labels_dir.mkdir()
    (labels_dir / "t.txt").write_text(",".join(CLASSES) + "\n" + "".join(f"{v}\n" for v in truth))
    report = ensemble.run(ensemble.members([str(cv)]), cv / "ensemble", "vote", labels_dir)
    val = {r["name"]: r for r in report["validation"]}
    assert set(val) == {"cv-fold0", "cv-fold1", "cv-fold2", "out-of-fold", "out-of-fold + post-processing"}
    assert val["cv-fold0"]["per_class_f1"][0] == 0 and val["cv-fold0"]["per_class_f1"][2] == 1
    # class 0: 2 of 3 right; classes 1, 2: 2 of 3 right and one false positive; class 3: one false positive
    assert val["out-of-fold"]["macro_f1"] == pytest.approx(np.mean([4 / 5, 4 / 6, 4 / 6, 6 / 7, 1, 1, 1, 1]))
    test = {r["name"]: r for r in report["test"]}
    assert test["ensemble (vote)"]["macro_f1"] == 1.0
    assert test["mean of members"]["macro_f1"] < 1.0
    assert test["cv-fold1"]["validation_macro_f1"] == val["cv-fold1"]["macro_f1"]
    assert preds_lib.load(cv / "ensemble" / "test.npz").label.tolist() == truth.tolist()
    md = (cv / "ensemble" / "report.md").read_text()
    assert "| Val set | Neutral | Anger" in md and "| ensemble (vote) |" in md
    # what produced it: each member's seed and the stamps of its config and shards (not there)
    (record,) = json.loads((cv / "ensemble" / "provenance.json").read_text())["runs"]
    assert record["seeds"] == {str(cv / f"fold{k}"): 10 + k for k in range(3)} and record["world_size"] == 1
    member = record["members"][str(cv / "fold1")]
    assert member["config"]["sha256"] == hashlib.sha256((cv / "fold1" / "config.yaml").read_bytes()).hexdigest()
    assert member["manifest"] == {"file": str((cv / "shards" / "manifest.json").resolve()), "sha256": None}
    # another head of the same models: the aux head always says Neutral
    aux = ensemble.run(ensemble.members([f"{cv}:aux"]), cv / "ensemble", "mean", labels_dir)
    assert {r["name"]: r for r in aux["test"]}["ensemble (mean)"]["per_class_f1"][1:] == [0.0] * 7


def test_an_ensemble_refused_on_its_test_predictions_writes_nothing(tmp_path):
    cv = tmp_path / "cv"
    for k in range(2):
        keys = np.array([f"v{k}/{i + 1:05d}" for i in range(8)])
        test_keys = np.array([f"t/{i + 1:05d}" for i in range(8 - k)])  # fold 1 misses a test frame
        fake_fold(cv, k, keys, np.arange(8), np.arange(8), test_keys, np.zeros(8 - k, int))
    with pytest.raises(ensemble.EnsembleError, match="1 missing, 0 extra, e.g. t/00008"):
        ensemble.run(ensemble.members([str(cv)]), cv / "ensemble", "vote")
    assert sorted(p.name for p in (cv / "ensemble").iterdir()) == ["test"]  # only the members' own files


def test_an_ensemble_into_a_run_or_shards_is_refused_and_a_lost_fold_config_named(tmp_path):
    cv = tmp_path / "cv"
    for k in range(2):
        keys = np.array([f"v{k}/{i + 1:05d}" for i in range(8)])
        fake_fold(cv, k, keys, np.arange(8), np.arange(8), keys[:1], np.zeros(1, int))
    before = {p: p.read_bytes() for p in cv.rglob("*") if p.is_file()}
    with pytest.raises(ensemble.EnsembleError, match="fold1 holds a training run"):
        ensemble.run(ensemble.members([str(cv)]), cv / "fold1")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    with pytest.raises(ensemble.EnsembleError, match="holds shards"):
        ensemble.run(ensemble.members([str(cv)]), tmp_path / "shards")
    assert {p: p.read_bytes() for p in cv.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["manifest.json"]
    (cv / "fold0" / "config.yaml").unlink()  # a fold is not left out in silence: named, and refused
    with pytest.raises(ensemble.EnsembleError, match="fold0: no config.yaml there"):
        ensemble.members([str(cv)])
    with pytest.raises(ensemble.EnsembleError, match="nowhere: no such folder"):
        ensemble.members([str(tmp_path / "nowhere")])


def test_a_member_is_named_after_its_folder_and_a_missing_truth_is_refused(tmp_path, monkeypatch):
    cv = tmp_path / "cv"
    for k in range(2):
        keys = np.array([f"v{k}/{i + 1:05d}" for i in range(8)])
        fake_fold(cv, k, keys, np.arange(8), np.arange(8), keys[:1], np.zeros(1, int))
    monkeypatch.chdir(cv)
    assert ensemble.Member(RunDir(Path("fold1"))).name == "cv-fold1"  # a relative folder too
    with pytest.raises(ensemble.EnsembleError, match="--truth .*nowhere: not a folder"):
        ensemble.run(ensemble.members(["."]), cv / "ensemble", truth=tmp_path / "nowhere")


def test_submissions_complete_or_refused(tmp_path):
    keys = np.array(["a/00001", "a/00002", "a/00003", "b/00001", "b/00002"])
    labels = np.array([3, 3, 4, 7, 0])
    files = submission.abaw3(keys, labels, {"a": 3, "b": 2})
    assert sorted(files) == ["a.txt", "b.txt"]
    assert files["a.txt"] == (",".join(CLASSES) + "\n3\n3\n4\n").encode()
    template = tmp_path / "template.csv"
    template.write_text("image_location," + ",".join(CLASSES) + "\nb/00002.jpg,\na/00001.jpg,\nb/00001.jpg,\n")
    required = submission.read_template(template)
    assert required == [("b", 2), ("a", 1), ("b", 1)]
    lines = submission.abaw5(keys, labels, required).decode().splitlines()
    assert lines[0].startswith("image_location,Neutral")
    assert lines[1:] == ["b/00002.jpg,0", "a/00001.jpg,3", "b/00001.jpg,7"]
    with pytest.raises(submission.SubmissionError, match="1 required frame.*a/00004"):
        submission.abaw3(keys, labels, {"a": 4, "b": 2})
    with pytest.raises(submission.SubmissionError, match="c/00009"):
        submission.abaw5(keys, labels, [*required, ("c", 9)])
    folder = tmp_path / "submission"  # a submission replaces the previous one whole
    submission.write(folder, {"abaw3/a.txt": b"1", "abaw3/c.txt": b"2", "abaw5.csv": b"3"})
    submission.write(folder, {"abaw3/b.txt": b"4", "abaw5.csv": b"5"})
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")) == ["abaw3/b.txt", "abaw5.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission", "template.csv"]


def test_a_submission_refused_in_either_format_writes_neither(tmp_path):
    from fer_dist.jobs.predict import submission_files

    keys = np.array(["a/00001", "a/00002", "b/00001"])
    logits = np.eye(NUM_CLASSES, dtype=np.float32)[[1, 1, 2]]
    test = preds_lib.Predictions(keys, np.full(3, -1), {"ensemble": logits}, "ensemble")
    identity = postprocess.PostParams()
    with pytest.raises(submission.SubmissionError, match="ABAW5/6 file: 1 required frame.*c/00001"):
        submission_files(test, identity, {"a": 2, "b": 1}, [("a", 1), ("a", 2), ("b", 1), ("c", 1)])  # ABAW3 complete
    files, made = submission_files(test, identity, {"a": 2, "b": 1}, [("b", 1), ("a", 2), ("b", 2)])
    assert made["abaw5_rows"] == 3 and made["abaw3_files"] == 2
    assert files["abaw3/a.txt"].decode().splitlines()[1:] == ["1", "1"]
    rows = files["abaw5.csv"].decode().splitlines()[1:]
    assert rows == ["b/00001.jpg,2", "a/00002.jpg,1", "b/00002.jpg,2"]  # past b's end: b's last frame's label


def test_a_malformed_template_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image_location,Neutral\nnot-a-frame\n")
    with pytest.raises(submission.SubmissionError, match="bad.csv:2"):
        submission.read_template(bad)
