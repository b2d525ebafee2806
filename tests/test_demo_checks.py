"""The main job's checks: what `fer-dist demo` reports as failed."""

from fer_dist.jobs.demo import checks

TEST = {"mean of members": 0.90, "ensemble (vote)": 0.92, "ensemble (vote) + post-processing": 0.93}


def fold(name: str, image: float, audio: float, ensemble: float) -> dict:
    return {"fold": name, "image": image, "audio": audio, "fusion": ensemble, "ensemble": ensemble}


def test_a_job_whose_prediction_beats_both_heads_and_whose_ensemble_helps_passes():
    assert checks([fold("fold0", 0.6, 0.7, 0.9), fold("fold1", 0.7, 0.6, 0.8)], TEST, "vote") == []


def test_each_failed_check_is_one_line_naming_what_failed():
    folds = [fold("fold0", 0.6, 0.7, 0.7), fold("fold1", 0.9, 0.6, 0.8)]
    test = {**TEST, "ensemble (vote)": 0.89, "ensemble (vote) + post-processing": 0.88}
    failed = checks(folds, test, "vote")
    assert len(failed) == 4
    assert failed[0].startswith("fold0: the prediction (0.700) is not above the audio head")
    assert failed[1].startswith("fold1: the prediction (0.800) is not above the image head")
    assert "below the mean of its members" in failed[2] and "post-processing lowers" in failed[3]


def test_a_main_job_of_no_epochs_is_refused_before_anything_is_made(tmp_path, capsys):
    """`--epochs 0` is not "the config's epochs": refused in one line, no data made."""
    from fer_dist import cli

    assert cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--epochs", "0"]) == 2
    assert "train.epochs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
