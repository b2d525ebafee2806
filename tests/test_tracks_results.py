"""Cross-validation, ensembles, post-processing and submissions of the action-unit and
valence-arousal tracks: the choices of post-processing on out-of-fold predictions built so that the
answer is known, the submission files' exact bytes, refusals that write nothing, and `fer-dist cv`
of each track on a small synthetic challenge whose report `fer-dist score` reproduces."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from fer_dist import cli
from fer_dist.data.packing.layout import discover
from fer_dist.data.packing.pack import pack
from fer_dist.data.packing.synth import ANNOTATIONS, TEST_LABEL_DIRS, TEST_LIST, TEST_TEMPLATES, synthesize
from fer_dist.data.shards.format import PackParams, read_manifest
from fer_dist.engine import predictions as preds_lib
from fer_dist.engine import provenance
from fer_dist.jobs.predict import submission_files
from fer_dist.results import ensemble, postprocess, submission
from fer_dist.tracks import ACTION_UNITS, TRACKS
from helpers import LENGTH, tiny_config, tiny_run


def keys_of(*videos: tuple[str, int]) -> np.ndarray:
    """The keys of frames 1..n of each (video, n)."""
    return np.array([f"{v}/{f:05d}" for v, n in videos for f in range(1, n + 1)])


def test_the_centred_mean_runs_over_frame_numbers_within_one_video():
    keys = np.array(["a/00001", "a/00002", "a/00003", "a/00005", "b/00001", "b/00002"])
    values = np.array([[0.0], [3.0], [6.0], [9.0], [100.0], [200.0]])
    smooth = postprocess.centred_mean(values, 1, *postprocess.video_frames(keys))
    # frame 3's window is frames 2-4 (4 has no prediction); frame 5's is 4-6: itself alone; b never mixes with a
    assert smooth[:, 0].tolist() == pytest.approx([1.5, 3.0, 4.5, 9.0, 150.0, 150.0])
    assert np.array_equal(postprocess.centred_mean(values, 0, *postprocess.video_frames(keys)), values)


def test_the_va_half_window_is_chosen_on_the_out_of_fold_p_va():
    """Each video holds one valence and one arousal, predicted with a ±0.3 error that flips sign every
    frame: the widest half-window of the grid averages it away best, and since no window reaches
    into the other video, the step between videos never blurs. Exact predictions need none."""
    keys = keys_of(("a", 120), ("b", 120), ("c", 120))
    truth = np.repeat([[0.6, -0.2], [-0.5, 0.4], [0.1, 0.0]], 120, axis=0)
    flip = np.where(np.arange(len(keys)) % 2, 0.3, -0.3)[:, None]
    params, before, after = postprocess.tune_track("va", keys, truth + flip, truth)
    assert params.half_window == 50 and params.track == "va"
    assert after > before and after > 0.99
    exact, before, after = postprocess.tune_track("va", keys, truth, truth)
    assert exact.half_window == 0 and before == after == pytest.approx(1.0)
    assert postprocess.PostParams.from_dict(params.to_dict()) == params
    assert params.to_dict() == {"track": "va", "half_window": 50}
    smooth = postprocess.apply(keys, truth + flip, params)
    assert smooth[:120] == pytest.approx(np.full((120, 2), [0.6, -0.2]), abs=0.3 / 51 + 1e-12)


def test_au_thresholds_and_smoothing_are_chosen_on_the_out_of_fold_predictions():
    """AU1 is on through video a and off through b; its probabilities alternate 0.7, 0.2 on a and
    0.1, 0.4 on b. Unsmoothed, the best cut (0.15 or 0.2; the nearer to 0.5 wins) takes every
    positive and half the negatives: F1 0.8. Over ±1 frame the positives lie in 0.367-0.533 and the
    negatives in 0.2-0.3, so 0.35 alone (of the grid) separates them: F1 1. Every other AU is 0.9
    where on and 0.05 where off: any cut separates them, and the one nearest 0.5 is 0.5."""
    keys = keys_of(("a", 10), ("b", 10))
    labels = np.zeros((20, 12), np.int8)
    labels[:10] = 1
    probs = np.where(labels == 1, 0.9, 0.05)
    probs[:10, 0] = np.tile([0.7, 0.2], 5)
    probs[10:, 0] = np.tile([0.1, 0.4], 5)
    params, before, after = postprocess.tune_track("au", keys, probs, labels)
    assert params.half_window == 1
    assert params.au_thresholds == (0.35,) + (0.5,) * 11
    assert before == pytest.approx((2 / 3 + 11) / 12)  # AU1 at 0.5: half the positives, no negative
    assert after == 1.0
    assert postprocess.apply(keys, probs, params).tolist() == labels.tolist()
    unsmoothed = postprocess.tune_track("au", keys[:10], probs[:10], labels[:10])[0]  # one video, all on
    assert unsmoothed.half_window == 0
    assert postprocess.PostParams.from_dict(params.to_dict()) == params
    # an expression track's parameters read and written as before
    old = {"window": 5, "thresholds": [0, 4] * 4, "neighbourhoods": [0, 2] * 4}
    assert postprocess.PostParams.from_dict(old).to_dict() == {
        k: tuple(v) if k != "window" else v for k, v in old.items()
    }
    assert "AU1 0.35" in postprocess.describe(params.to_dict())


def test_submissions_of_each_track_hold_the_tracks_header_and_rows():
    keys = np.array(["a/00001", "a/00002", "b/00001"])
    au = np.zeros((3, 12), np.int8)
    au[0, [0, 11]] = 1
    au[2, 5] = 1
    files = submission.abaw3(keys, au, {"a": 2, "b": 1}, "au")
    header = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26\n"
    assert files["a.txt"].decode() == header + "1,0,0,0,0,0,0,0,0,0,0,1\n" + "0,0,0,0,0,0,0,0,0,0,0,0\n"
    assert files["b.txt"].decode() == header + "0,0,0,0,0,1,0,0,0,0,0,0\n"
    va = np.array([[0.25, -0.5], [0.123456789, 1.0], [-1.0, 0.0]])
    rows = submission.abaw5(keys, va, [("b", 1), ("a", 2), ("a", 1)], track="va").decode().splitlines()
    assert rows == [
        "image_location,valence,arousal",
        "b/00001.jpg,-1,0",
        "a/00002.jpg,0.123457,1",
        "a/00001.jpg,0.25,-0.5",
    ]
    assert submission.abaw3(keys, va, {"b": 1}, "va")["b.txt"] == b"valence,arousal\n-1,0\n"
    with pytest.raises(submission.SubmissionError, match="1 required frame.*a/00003"):
        submission.abaw3(keys, va, {"a": 3}, "va")


def test_a_track_submission_refused_in_either_format_writes_neither(tmp_path):
    keys = np.array(["a/00001", "a/00002", "b/00001"])
    probs = np.array([[0.9] * 12, [0.3] * 12, [0.6] * 12])
    test = ensemble.as_predictions("au", keys, TRACKS["au"].empty(3), probs, np.full(3, -1))
    assert ensemble.ensemble_values(test) == pytest.approx(probs)
    cut = postprocess.PostParams(track="au", au_thresholds=(0.5,) * 11 + (0.95,))
    with pytest.raises(submission.SubmissionError, match="ABAW5/6 file: 1 required frame.*c/00001"):
        submission_files(test, cut, {"a": 2, "b": 1}, [("a", 1), ("c", 1)])
    assert not list(tmp_path.iterdir())
    files, made = submission_files(test, cut, {"a": 2, "b": 1}, [("b", 1), ("a", 2), ("b", 2)])
    assert files["abaw3/a.txt"].decode().splitlines()[1:] == ["1,1,1,1,1,1,1,1,1,1,1,0", "0,0,0,0,0,0,0,0,0,0,0,0"]
    assert files["abaw5.csv"].decode().splitlines()[3] == "b/00002.jpg,1,1,1,1,1,1,1,1,1,1,1,0"  # b's last frame
    assert made["au_on"] == {**dict.fromkeys(ACTION_UNITS, 2), "AU26": 0}
    template = tmp_path / "template.csv"
    template.write_text("image_location,valence,arousal\na/00001.jpg,\n")
    with pytest.raises(submission.SubmissionError, match="a template of valence-arousal .*not of action units"):
        submission.read_template(template, "au")


def fake_run(folder, track: str, fold: int) -> None:
    """A finished run of `track` holding out `fold`: its config, best epoch and that epoch's predictions."""
    t = TRACKS[track]
    (folder / "checkpoints" / "best").mkdir(parents=True)
    config = {"tracks": [track], "data": {"holdout_fold": fold, "shards": str(folder / "shards")}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "checkpoints" / "best" / "metrics.json").write_text(json.dumps({"epoch": 1}))
    (folder / "predictions").mkdir()
    keys = keys_of((f"v{fold}", 4))
    truth = {} if track == "expr" else {track: np.zeros((4, t.outputs), np.float32)}
    p = preds_lib.Predictions(
        keys, np.zeros(4, int), {"ensemble": np.zeros((4, t.outputs))}, "ensemble", (track,), truth
    )
    preds_lib.save(folder / "predictions" / "epoch001.npz", p)


def test_members_of_different_tracks_are_refused_in_one_line(tmp_path, capsys):
    fake_run(tmp_path / "cv" / "fold0", "au", 0)
    fake_run(tmp_path / "cv" / "fold1", "va", 1)
    fake_run(tmp_path / "expr_run", "expr", 0)
    out = tmp_path / "ensemble"
    assert cli.main(["ensemble", str(tmp_path / "cv"), "--out", str(out)]) == 2
    said = capsys.readouterr()
    (line,) = (said.out + said.err).strip().splitlines()
    assert "error:" in line and "cv-fold1 learns valence-arousal but cv-fold0 action units" in line
    assert not out.exists()
    with pytest.raises(ensemble.EnsembleError, match="cv-fold0 learns action units but .*expr_run expressions"):
        ensemble.members([str(tmp_path / "expr_run"), str(tmp_path / "cv" / "fold0")])  # names in the spec's order
    assert ensemble.track_of(ensemble.members([str(tmp_path / "cv" / "fold0")])) == "au"


@pytest.fixture(scope="module")
def challenge(tmp_path_factory):
    """Six videos labelled for the three tracks and two test videos, packed into 2 folds (each holds
    frames of every track)."""
    root = tmp_path_factory.mktemp("tracks_results")
    synthesize(root / "data", 6, seed=5, workers=2, length=LENGTH, tracks=("expr", "au", "va"), test_videos=2)
    videos = discover(root / "data", test_list=root / "data" / TEST_LIST)
    pack(videos, root / "shards", PackParams(samples_per_shard=300, n_folds=2), workers=2)
    return root


@pytest.fixture(scope="module")
def cross_validated(challenge):
    """A cross-validation of a track (its folder), made once per track. Its folds are trained here
    (no process started), as a cluster trains folds apart; then, for action units, `fer-dist cv`
    finds them finished and predicts, ensembles and submits; for valence-arousal, `fer-dist predict`
    does what `fer-dist cv` does after its folds."""
    made = {}

    def get(track: str):
        if track not in made:
            data, cv, shards = challenge / "data", challenge / f"cv_{track}", challenge / "shards"
            scoring = ["--truth", str(data / TEST_LABEL_DIRS[track]), "--template", str(data / TEST_TEMPLATES[track])]
            for k in (0, 1):
                fold = tiny_run(shards, cv / f"fold{k}", f"tracks=[{track}]", f"data.holdout_fold={k}")
                assert cli.main(["train", "--config", "mfm_cpu", *fold, "train.log_with=[]"]) == 0
            if track == "au":
                config = tiny_config(challenge / f"{track}.yaml", shards, f"tracks=[{track}]", "train.log_with=[]")
                assert cli.main(["cv", "--config", str(config), "--cv-dir", str(cv), *scoring]) == 0
            else:
                predict = ["predict", str(cv), "--shards", str(shards), "--out", str(cv / "ensemble")]
                assert cli.main([*predict, *scoring]) == 0
            made[track] = cv
        return made[track]

    return get


def score(track: str, annotations, submitted, capsys) -> dict:
    """`fer-dist score --json` of a submission."""
    capsys.readouterr()
    args = ["score", "--track", track, "--annotations", str(annotations), "--submission", str(submitted), "--json"]
    assert cli.main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("track", ["au", "va"])
def test_cv_of_a_track_reports_submits_and_is_scored_alike_by_fer_dist_score(
    track, challenge, cross_validated, tmp_path, capsys
):
    cv, data, t = cross_validated(track), challenge / "data", TRACKS[track]
    folder = cv / "ensemble"
    report = json.loads((folder / "report.json").read_text())
    assert report["track"] == track and report["how"] == "mean"
    rows = {r["name"]: r for r in report["validation"]}
    for k in (0, 1):  # each fold's row is its run's own held-out figure
        best = json.loads((cv / f"fold{k}" / "checkpoints" / "best" / "metrics.json").read_text())
        assert rows[f"cv_{track}-fold{k}"][t.metric] == pytest.approx(best[t.metric], abs=1e-12)
    tuned = json.loads((folder / "postprocess.json").read_text())
    assert {k: v for k, v in tuned.items() if not k.startswith("validation_")} == report["postprocess"]
    assert tuned[f"validation_{t.metric}_after"] == rows["out-of-fold + post-processing"][t.metric]
    shown = provenance.figures(folder)  # what `fer-dist inspect` shows: the track's metric
    assert shown["on the held-out folds"]["out-of-fold"] == rows["out-of-fold"][t.metric]
    assert set(provenance.figures(cv / "fold0")["epoch 1 (best)"]) == {"image", "audio", "fusion", "ensemble"}
    md = (folder / "report.md").read_text()
    head = "| Val set | AU1 | AU2 | AU4 |" if track == "au" else "| Val set | CCC valence | CCC arousal | mean |"
    assert head in md and "| out-of-fold + post-processing |" in md and "| ensemble (mean) + post-processing |" in md

    # the out-of-fold predictions as an ABAW5/6 file, scored against every annotation file of the track
    oof = preds_lib.load(folder / "validation.npz")
    assert oof.tracks == (track,) and t.annotated(oof.labels(track)).all()
    params = postprocess.PostParams.from_dict(report["postprocess"])
    decided = postprocess.apply(oof.key, ensemble.ensemble_values(oof), params)
    videos, frames = preds_lib.split_keys(oof.key)
    (tmp_path / "oof.csv").write_bytes(
        submission.abaw5(oof.key, decided, list(zip(videos.tolist(), frames.tolist(), strict=True)), track=track)
    )
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for f in (data / ANNOTATIONS / t.folders[0]).glob("*/*.txt"):
        shutil.copy(f, annotations / f.name)
    scored = score(track, annotations, tmp_path / "oof.csv", capsys)
    assert scored["frames"] == len(oof)
    assert scored[t.metric] == pytest.approx(rows["out-of-fold + post-processing"][t.metric], abs=1e-5)

    # the test submission in both formats, scored against the test labels: the report's test figure
    test = {r["name"]: r for r in report["test"]}["ensemble (mean) + post-processing"]
    for sub in (folder / "submission" / "abaw5.csv", folder / "submission" / "abaw3"):
        assert score(track, data / TEST_LABEL_DIRS[track], sub, capsys)[t.metric] == pytest.approx(
            test[t.metric], abs=1e-5
        )
    header = ",".join(t.columns)
    template = (data / TEST_TEMPLATES[track]).read_text().splitlines()
    written = (folder / "submission" / "abaw5.csv").read_text().splitlines()
    assert written[0] == "image_location," + header
    assert [r.split(",")[0] for r in written[1:]] == [r.split(",")[0] for r in template[1:]]
    manifest = read_manifest(challenge / "shards")
    for video, r in ((v, r) for v, r in manifest.videos.items() if r.split == "test"):
        lines = (folder / "submission" / "abaw3" / f"{video}.txt").read_text().splitlines()
        assert lines[0] == header and len(lines) == r.frames + 1
        assert all(len(line.split(",")) == t.outputs for line in lines[1:])
        crops = next(p for p in data.rglob(video) if p.is_dir())
        faceless = [f for f in range(1, r.frames + 1) if not (crops / f"{f:05d}.jpg").exists()]
        assert faceless and all(lines[f] for f in faceless)  # frames without a face have their row


def test_a_refused_prediction_of_a_track_leaves_the_submission_as_it_was(challenge, cross_validated, capsys):
    cv, data = cross_validated("au"), challenge / "data"
    before = {p: p.read_bytes() for p in (cv / "ensemble").rglob("*") if p.is_file()}
    common = ["predict", str(cv), "--shards", str(challenge / "shards"), "--out", str(cv / "ensemble")]
    capsys.readouterr()
    assert cli.main([*common, "--template", str(data / TEST_TEMPLATES["va"])]) == 2
    assert "a template of valence-arousal" in capsys.readouterr().err
    template = cv / "asks_too_much.csv"
    template.write_text((data / TEST_TEMPLATES["au"]).read_text() + "no-such-video/00001.jpg,\n")
    assert cli.main([*common, "--template", str(template)]) == 2
    assert "refusing to predict" in capsys.readouterr().err
    template.unlink()
    assert {p: p.read_bytes() for p in (cv / "ensemble").rglob("*") if p.is_file()} == before
    # the ensemble of both tracks' folds is refused before anything is written
    assert cli.main(["ensemble", str(cv), str(cross_validated("va")), "--out", str(challenge / "both")]) == 2
    assert "learns valence-arousal but" in capsys.readouterr().err and not (challenge / "both").exists()


def test_a_cv_holding_out_a_fold_without_frames_of_its_track_is_refused_before_training(challenge, capsys):
    """In 3 folds, fold 2's videos carry no valence-arousal: refused before fold 0 trains."""
    data, shards = challenge / "data", challenge / "shards3"
    pack(discover(data, test_list=data / TEST_LIST), shards, PackParams(samples_per_shard=300, n_folds=3), workers=2)
    assert read_manifest(shards).frames_of("fold2", ("va",)) == 0 < read_manifest(shards).frames_of("fold2", ("au",))
    config = tiny_config(challenge / "va3.yaml", shards, "tracks=[va]")
    capsys.readouterr()
    assert cli.main(["cv", "--config", str(config), "--cv-dir", str(challenge / "cv3")]) == 2
    assert "fold2 holds no frames labelled for valence-arousal" in capsys.readouterr().err
    assert not (challenge / "cv3").exists()
