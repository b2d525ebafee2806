"""The main job's checks: what `fer-dist demo` reports as failed."""

from fer_dist.jobs.demo import checks

TEST = {"mean of members": 0.90, "ensemble (vote)": 0.92, "ensemble (vote) + post-processing": 0.93}
MEAN = {"mean of members": 0.50, "ensemble (mean)": 0.52, "ensemble (mean) + post-processing": 0.53}


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


def test_the_au_job_asks_every_head_for_the_baseline_plus_0_20_and_ties_with_a_head_pass():
    base = {"fold": "fold0", "image": 0.50, "audio": 0.46, "fusion": 0.48, "ensemble": 0.50, "always_positive": 0.26}
    assert checks([base], MEAN, "mean", "au") == []  # the prediction ties the image head: at least as high
    low = {**base, "fold": "fold1", "audio": 0.45}  # 0.45 < 0.26 + 0.20
    failed = checks([base, low], MEAN, "mean", "au")
    assert failed == ["fold1: the audio head's mean AU F1 (0.450) is below always positive + 0.20 (0.460)"]
    under = {**base, "ensemble": 0.49}
    assert checks([under], MEAN, "mean", "au")[0].startswith("fold0: the prediction (0.490) is not above the image")


def test_the_va_job_asks_the_prediction_for_a_p_va_of_0_50():
    assert checks([fold("fold0", 0.40, 0.45, 0.55)], MEAN, "mean", "va") == []
    assert checks([fold("fold0", 0.40, 0.45, 0.49)], MEAN, "mean", "va") == ["fold0: P_VA 0.490 is below 0.50"]
