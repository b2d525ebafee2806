"""`fer-dist annotate` on real footage with a model trained on real footage: one CSV row per
decoded frame with its own timestamp, the ABAW3 file, the timeline PNG, a playable MP4; a video
without a face and a corrupt one; the run's post-processing found and applied."""

import csv
import json

import av
import numpy as np
import pytest
from PIL import Image

from fer_dist import cli
from fer_dist.engine.rundir import RunDir
from fer_dist.jobs import annotate
from fer_dist.labels import CLASSES
from fer_dist.results import postprocess


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def frame_times(path) -> list[float]:
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(video=0)]


def test_the_runs_postprocessing_is_found_beside_it_or_in_its_cross_validation(tmp_path):
    fold = tmp_path / "cv" / "fold0"
    fold.mkdir(parents=True)
    assert annotate.postprocessing(RunDir(fold)) == (postprocess.PostParams(), None)
    chosen = postprocess.PostParams(5, (2,) * 8, (2,) * 8)
    (tmp_path / "cv" / "ensemble").mkdir()
    (tmp_path / "cv" / "ensemble" / "postprocess.json").write_text(json.dumps(chosen.to_dict()))
    assert annotate.postprocessing(RunDir(fold)) == (chosen, tmp_path / "cv" / "ensemble" / "postprocess.json")
    (fold / "postprocess.json").write_text(json.dumps(postprocess.PostParams(11).to_dict()))
    assert annotate.postprocessing(RunDir(fold))[0].window == 11


def test_a_folder_without_a_trained_model_is_refused_before_any_video_is_read(real_footage, tmp_path):
    video = str(real_footage / "single_face.mp4")
    assert cli.main(["annotate", video, "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_annotate_gives_every_decoded_frame_the_abaw3_file_a_timeline_and_a_video(real_run, real_footage, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("single_face.mp4", "face_noface.mov", "no_face.mp4"):
        (videos / name).symlink_to(real_footage / name)
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(4000))
    out = tmp_path / "out"
    run = real_run / "run"
    window = postprocess.PostParams(41)  # the run's post-processing: a 41-frame moving average
    (run / "postprocess.json").write_text(json.dumps(window.to_dict()))
    try:
        assert cli.main(["annotate", str(videos), "--model", str(run), "--out", str(out), "--render"]) == 0
    finally:
        (run / "postprocess.json").unlink()

    for name, frames, with_face in (("single_face", 72, 0.95 * 72), ("face_noface", 169, 0.95 * 72)):
        rows = read_csv(out / f"{name}.csv")
        times = frame_times(videos / (name + (".mov" if name == "face_noface" else ".mp4")))
        assert [int(r["frame"]) for r in rows] == list(range(1, frames + 1)) == list(range(1, len(times) + 1))
        assert np.allclose([float(r["time"]) for r in rows], times, atol=1e-4)  # each frame's own timestamp
        found = np.array([int(r["face"]) for r in rows])
        assert found.sum() >= with_face
        if name == "face_noface":
            assert not found[72:].any()  # the animation after the cut shows no face
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        labels = np.array([int(r["label"]) for r in rows])
        assert np.allclose(probs.sum(1), 1, atol=1e-3) and [r["expression"] for r in rows] == [
            CLASSES[k] for k in labels
        ]
        smoothed = postprocess.moving_average(probs, window.window).argmax(1)
        assert (labels == smoothed).mean() > 0.99  # the run's post-processing was applied (4-decimal CSV)
        abaw3 = (out / f"{name}.txt").read_text().splitlines()
        assert abaw3[0] == ",".join(CLASSES) and [int(v) for v in abaw3[1:]] == labels.tolist()
        png = Image.open(out / f"{name}.png")
        assert png.format == "PNG" and png.size[0] >= 1000
    with av.open(str(out / "face_noface.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 169 and decoded[0].shape == (540, 960, 3)

    no_face = read_csv(out / "no_face.csv")
    assert len(no_face) == 95 and all(r["face"] == "0" and r["label"] == "" for r in no_face)
    assert not (out / "no_face.txt").exists() and not (out / "no_face.png").exists()
    assert not list(out.glob("corrupt*"))


@pytest.mark.slow
def test_annotate_with_no_readable_video_fails(real_run, tmp_path, capsys):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(20_000))
    assert cli.main(["annotate", str(garbage), "--model", str(real_run / "run"), "--out", str(tmp_path / "o")]) == 1
    assert "no video could be annotated" in capsys.readouterr().err
