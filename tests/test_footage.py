"""Real footage, quirk by quirk: a synthetic challenge whose videos, sound, crops and annotations are
edited with PyAV and PIL so that each carries one quirk of real data (a recorder's stall, sound of
20 ms, sound that stops or starts late, a container without a frame count, crops of every size,
an annotation longer than its video, a fold left empty), packed once by `fer-dist shard`, then held
to the right value of each: where each frame's sound lies, what is counted and warned, what is
refused before anything is written."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fer_dist.data.audio import SILENCE
from fer_dist.data.format import read_manifest
from fer_dist.data.layout import discover, list_crops, read_annotation
from fer_dist.data.synth import TEST_LIST, TEST_TEMPLATE, synthesize
from helpers import REPO, samples, tiny_run

pytestmark = pytest.mark.slow  # the module packs its own dataset once
QUIET = float(np.float16(SILENCE))  # a silent log-mel column as the shards store it
LOUD = -5.0  # a log-mel column above this holds the tone


def write_video(path: Path, times: list[float], sound: np.ndarray | None = None, rate: int = 16000, start=0.0):
    """64 x 64 H.264 frames shown at `times` (s); AAC `sound` [channels, samples] at `rate` Hz from
    `start` s (1 channel: mono, 6: 5.1). Matroska when `path` ends in .mkv."""
    tb = Fraction(1, 1000) if path.suffix == ".mkv" else Fraction(1, 30000)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width = video.height = 64
        video.pix_fmt, video.time_base = "yuv420p", tb
        layout = {1: "mono", 6: "5.1"}[len(sound)] if sound is not None else None
        audio = out.add_stream("aac", rate=rate, layout=layout) if sound is not None else None
        for t in times:
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / tb), tb
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio is not None:
            for s in range(0, sound.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound[:, s : s + 1024]), "fltp", layout)
                frame.sample_rate, frame.pts = rate, s + round(start * rate)
                out.mux(audio.encode(frame))
            out.mux(audio.encode())


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    return np.repeat((0.3 * np.sin(np.arange(round(seconds * rate)) * 0.2)).astype(np.float32)[None], channels, 0)


def remux(src: Path, dst: Path, **options) -> None:
    """The same packets in another container (or a fragmented MP4: no frame count in its header)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", **options) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                o.mux(packet)


def decoded_times(path: Path) -> list[Fraction]:
    """Each frame's presentation time as PyAV's decoder gives it: the truth the tests hold to."""
    with av.open(str(path)) as container:
        return [Fraction(f.pts) * f.time_base for f in container.decode(video=0)]


def sound_seconds(path: Path) -> tuple[float, float]:
    """Where the decoded sound starts and ends (s)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(audio=0))
    start = float(frames[0].pts * frames[0].time_base)
    return start, start + sum(f.samples for f in frames) / frames[0].sample_rate


def stall(n: int, after: dict[int, float]) -> list[float]:
    """n frames at 30 fps, paused for `after[k]` s after frame k (1-based)."""
    return [i / 30 + sum(pause for k, pause in after.items() if i >= k) for i in range(n)]


def crop_size(k: int) -> tuple[int, int]:
    """Crop k's own (width, height) px: no two crops of the video share a size."""
    return 40 + k, 40 + (13 * k) % 200


@pytest.fixture(scope="module")
def quirky(tmp_path_factory) -> SimpleNamespace:
    """Eight labelled videos in eight folds (one parent video each) and two test videos, each
    edited to carry its quirks, packed with `fer-dist shard --audio-wave`."""
    root = tmp_path_factory.mktemp("quirky")
    data = root / "data"
    synthesize(data, 8, seed=1, workers=2, length=300, test_videos=2)
    videos = {v.name: v for v in discover(data, test_list=data / TEST_LIST)}
    length = {n: len(read_annotation(v.annotation)) for n, v in videos.items() if v.annotation}

    left = videos["1-30-640x360_left"]  # a BOM and CRLF line ends; greyscale and CMYK crops
    lines = left.annotation.read_text().splitlines()
    left.annotation.write_bytes("\ufeff".encode() + "\r\n".join(lines).encode() + b"\r\n")
    for k, path in enumerate(sorted(left.crops.glob("*.jpg"))[:40]):
        Image.open(path).convert("L" if k % 2 else "CMYK").save(path, quality=90)
    right = videos["1-30-640x360_right"]  # every crop its own size, as in the organisers' `cropped/`
    for k, path in enumerate(sorted(right.crops.glob("*.jpg"))):
        Image.open(path).resize(crop_size(k)).save(path, quality=90)
    avi = videos["2-25-640x360"]  # an annotation 40 lines longer than its video
    avi.annotation.write_text(avi.annotation.read_text() + "4\n" * 40)
    shutil.rmtree(videos["3-30-640x360"].crops)  # no face found: its fold is left empty

    n = length["4-30-640x360"]  # a 3 s stall after frame 166; sound only while frames 167-200 show
    times = stall(n, {166: 3.0})
    sound = np.zeros((1, round((times[-1] + 1) * 16000)), np.float32)
    sound[:, round(times[166] * 16000) : round((times[199] + 1 / 30) * 16000)] = 0.3
    sound *= np.sin(np.arange(sound.shape[1]) * 0.2)
    write_video(videos["4-30-640x360"].media, times, sound)
    n = length["5-30-640x360"]  # 20 ms of sound
    write_video(videos["5-30-640x360"].media, stall(n, {}), tone(0.02, 44100), rate=44100)
    n = length["6-25-640x360"]  # 5.1 sound at 48 kHz that stops 2 s into the video
    write_video(videos["6-25-640x360"].media, stall(n, {}), tone(2.0, 48000, channels=6), rate=48000)

    mkv = videos["7-30-640x360"]  # Matroska (no frame count), stalls of 1.5 s and 0.7 s, tone in frames 80-120
    n = length[mkv.name]
    times = stall(n, {60: 1.5, 150: 0.7})
    sound = np.zeros((1, round((times[-1] + 1) * 8000)), np.float32)
    sound[:, round(times[79] * 8000) : round((times[119] + 1 / 30) * 8000)] = 0.3
    sound *= np.sin(np.arange(sound.shape[1]) * 0.2)
    mkv.media.unlink()
    write_video(mkv.media.with_suffix(".mkv"), times, sound, rate=8000)

    late = videos["8-30-640x360"]  # the sound starts 3 s late; no Fear frame in the annotation
    n = length[late.name]
    write_video(late.media, stall(n, {}), tone(n / 30 - 3, 16000), start=3.0)
    header, *labels = late.annotation.read_text().splitlines()
    late.annotation.write_text("\n".join([header, *("0" if x == "3" else x for x in labels)]) + "\n")

    test = videos["9-30-640x360"]  # a fragmented MP4: no frame count in its header; no face in the last 14 frames
    remux(test.media, root / "frag.mp4", format="mp4", options={"movflags": "frag_keyframe+empty_moov"})
    shutil.move(root / "frag.mp4", test.media)
    for path in sorted(test.crops.glob("*.jpg"))[-14:]:
        path.unlink()
    test = videos["10-30-640x360"]  # Matroska, crops of every size, none in the last 10 frames
    remux(test.media, test.media.with_suffix(".mkv"))
    test.media.unlink()
    crops = sorted(test.crops.glob("*.jpg"))
    for path in crops[-10:]:
        path.unlink()
    for k, path in enumerate(crops[:-10]):
        Image.open(path).resize(crop_size(k)).save(path, quality=90)

    shards = root / "shards"
    cmd = [sys.executable, "-m", "fer_dist.cli", "shard", "--root", str(data), "--out", str(shards)]
    cmd += ["--test-list", str(data / TEST_LIST), "--n-folds", "8", "--samples-per-shard", "200", "--audio-wave"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(shards)
    by_video: dict[str, dict[int, dict]] = {}
    for s in samples(shards):
        meta = json.loads(s["json"])
        by_video.setdefault(meta["video"], {})[meta["frame"]] = {
            "meta": meta,
            "mel": np.load(io.BytesIO(s["mel.npy"]), allow_pickle=False),
            "wave": np.load(io.BytesIO(s["wav.npy"]), allow_pickle=False),
            "jpg": s["jpg"],
        }
    videos = {v.name: v for v in discover(data, test_list=data / TEST_LIST)}
    return SimpleNamespace(data=data, shards=shards, result=result, manifest=manifest, samples=by_video, videos=videos)


def warning(quirky, *words: str) -> str:
    """The one warning line that holds all `words` (there must be one)."""
    lines = [line for line in quirky.manifest.problems if all(w in line for w in words)]
    assert len(lines) == 1, (words, quirky.manifest.problems)
    assert lines[0] in " ".join(quirky.result.stderr.split())  # printed too, not only recorded
    return lines[0]


def loud_frames(quirky, video: str) -> list[int]:
    """Frames whose own log-mel column (the window's centre) holds the tone."""
    return sorted(f for f, s in quirky.samples[video].items() if s["mel"][:, 32].astype(float).max() > LOUD)


@pytest.mark.parametrize(
    "video, stalls, heard",
    [("4-30-640x360", {166: 3.0}, (167, 200)), ("7-30-640x360", {60: 1.5, 150: 0.7}, (80, 120))],
    ids=["mp4-one-stall", "mkv-two-stalls"],
)
def test_each_frame_hears_the_sound_at_its_own_timestamp(quirky, video, stalls, heard):
    """A variable-frame-rate video: frame i's log-mel column and waveform window are centred on its
    presentation timestamp, so the sound heard while frames a..b show is in exactly their windows;
    the stall is measured and warned about."""
    q = quirky.manifest.videos[video].quality
    assert q.timing == "timestamps" and q.video_frames == len(decoded_times(quirky.videos[video].media))
    assert q.timing_drift_s == pytest.approx(sum(stalls.values()), abs=0.01)
    loud, packed = loud_frames(quirky, video), set(quirky.samples[video])  # labelled frames only
    assert {heard[0], heard[1]} <= packed and abs(loud[0] - heard[0]) <= 1 and abs(loud[-1] - heard[1]) <= 1, loud
    assert set(range(heard[0] + 1, heard[1])) & packed <= set(loud)
    centre = {f: np.abs(s["wave"][16967:17167].astype(float)).mean() for f, s in quirky.samples[video].items()}
    assert all(centre[f] > 1000 for f in range(heard[0] + 1, heard[1]) if f in centre)
    assert all(centre[f] < 100 for f in centre if f < heard[0] - 1 or f > heard[1] + 1)
    assert "variable frame rate" in warning(quirky, f"{video}:", "variable frame rate")


def test_sound_of_20_ms_is_packed_with_silence_after_it(quirky):
    name = "5-30-640x360"
    record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
    assert record.audio and record.samples == record.labelled and q.audio_s < 0.1
    assert all(s["mel"][:, 32].max() == QUIET for f, s in quirky.samples[name].items() if f > 5)
    line = warning(quirky, f"{name}:", "ends")
    assert f"the sound ({q.audio_s:.2f} s of it) ends" in line


def test_sound_that_ends_early_is_counted_and_no_pad_exceeds_the_window(quirky):
    name = "6-25-640x360"
    q = quirky.manifest.videos[name].quality
    _, end = sound_seconds(quirky.videos[name].media)
    times = decoded_times(quirky.videos[name].media)
    assert q.frames_without_sound == sum(float(t) > end for t in times)
    assert q.audio_early_end_s == pytest.approx(float(times[-1]) - end, abs=1e-3)
    for video in quirky.samples.values():  # every sample of every video
        for s in video.values():
            before, after = s["meta"]["pad"]
            assert 0 <= before <= 64 and 0 <= after <= 64 and before + after <= 64
    for f, s in quirky.samples[name].items():
        if float(times[f - 1]) > end + 33 / 30:  # the whole window after the sound
            assert s["meta"]["pad"] == [0, 64] and s["mel"].max() == QUIET and not s["wave"].any()
    assert f"{q.frames_without_sound} frame(s) hear silence" in warning(quirky, f"{name}:", "ends")


def test_sound_that_starts_late_is_counted(quirky):
    name = "8-30-640x360"
    q = quirky.manifest.videos[name].quality
    start, _ = sound_seconds(quirky.videos[name].media)
    assert start == pytest.approx(3.0, abs=0.1) and q.audio_late_s == pytest.approx(start, abs=1e-3)
    assert q.frames_without_sound == sum(float(t) < start for t in decoded_times(quirky.videos[name].media))
    assert all(s["mel"][:, 32].max() == QUIET for f, s in quirky.samples[name].items() if f <= 85)
    assert all(s["meta"]["pad"][0] == 64 for f, s in quirky.samples[name].items() if f <= 50)
    assert f"the sound starts {q.audio_late_s:.2f} s after the first frame" in warning(quirky, f"{name}:", "starts")


def test_labels_past_the_end_of_the_video_are_kept_filled_silent_and_counted(quirky):
    name = "2-25-640x360"  # an .avi
    record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
    frames = len(decoded_times(quirky.videos[name].media))
    assert q.video_frames == frames == q.header_frames and q.labels_past_end == 40
    assert record.frames == frames + 40 and record.samples == record.labelled
    past = {f: s for f, s in quirky.samples[name].items() if f > frames}
    assert len(past) == 40
    for s in past.values():
        assert s["meta"]["filled_from"] is not None and s["meta"]["filled_from"] <= frames
        assert s["mel"][:, 32].max() == QUIET and not s["wave"].any() and s["meta"]["pad"][1] >= 32
    assert "40 label(s) past the video's last frame" in warning(quirky, f"{name}:", "past")


def test_a_container_without_a_frame_count_is_counted_by_decoding(quirky):
    """Test videos in a fragmented MP4 and in Matroska (no frame count in the header), their last
    frames without a crop: every frame of the video is packed, the count from decoding."""
    for name in ("9-30-640x360", "10-30-640x360"):
        record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
        frames = len(decoded_times(quirky.videos[name].media))
        assert q.header_frames == 0 and q.video_frames == record.frames == record.samples == frames
        assert sorted(quirky.samples[name]) == list(range(1, frames + 1))
        assert "decoding counts" in warning(quirky, f"{name}:", "no frame count")


def test_crops_of_any_size_and_colour_model_are_packed_and_reported(quirky):
    right = quirky.manifest.videos["1-30-640x360_right"]
    sizes = [crop_size(k) for k in range(len(list_crops(quirky.videos["1-30-640x360_right"].crops)))]
    assert right.quality.crop_width == [min(w for w, _ in sizes), max(w for w, _ in sizes)]
    assert right.quality.crop_height == [min(h for _, h in sizes), max(h for _, h in sizes)]
    assert right.corrupt_crops == 0 and right.samples == right.labelled
    assert "loader workers bring a batch" in warning(quirky, "crops of varying size")
    left = quirky.manifest.videos["1-30-640x360_left"]  # greyscale and CMYK crops, a BOM and CRLF ends
    assert left.corrupt_crops == 0 and left.samples == left.labelled and left.quality.crop_width == [112, 112]
    labels = {f: s["meta"]["label"] for f, s in quirky.samples["1-30-640x360_left"].items()}
    truth = read_annotation(quirky.videos["1-30-640x360_left"].annotation)
    assert labels == {f + 1: int(v) for f, v in enumerate(truth) if v >= 0}
    rows = {r["video"]: r for r in json.loads(inspect_json(quirky.shards))["quality"]}
    assert {"1-30-640x360_right", "2-25-640x360", "4-30-640x360", "6-25-640x360", "9-30-640x360"} <= set(rows)
    assert rows["4-30-640x360"]["found"][0].startswith("variable frame rate") and "1-30-640x360_left" not in rows
    assert rows["9-30-640x360"]["header"] == "none" and rows["9-30-640x360"]["frames"] == 355
    assert "data quality: 10 of 11 videos to look at" in quirky.result.stdout


def inspect_json(shards: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fer_dist.cli", "inspect", str(shards), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:]
    return result.stdout


def test_the_workers_and_the_device_bring_crops_of_every_size_to_one(quirky):
    """A batch of crops each of its own size: decoded in a worker (`data.decode: cpu`) and on the
    device (`gpu`, here the CPU), both brought to the model's size, to the same bits."""
    from fer_dist.config import DataConfig
    from fer_dist.data import stream
    from fer_dist.data.transforms import decode_on, prepare

    crops = [s["jpg"] for s in list(quirky.samples["1-30-640x360_right"].values())[:8]]
    assert len({Image.open(io.BytesIO(c)).size for c in crops}) == 8
    frames = [stream.decode_frame({"__key__": str(k), "label": 0, "jpg": c}, ("image",)) for k, c in enumerate(crops)]
    in_worker = stream.as_tensors(stream.collate(frames, image_size=48))
    on_device = decode_on([torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in crops], torch.device("cpu"), 48)
    assert in_worker["image"].shape == (8, 3, 48, 48) and torch.equal(in_worker["image"], on_device)
    cfg, manifest = DataConfig(shards=str(quirky.shards), image_size=48), quirky.manifest
    jpeg = {"jpeg": torch.from_numpy(np.concatenate([np.frombuffer(c, np.uint8) for c in crops]))}
    jpeg["jpeg_lengths"] = torch.tensor([len(c) for c in crops])
    for train in (False, True):
        torch.manual_seed(0)
        a = prepare({"label": torch.zeros(8), "image": in_worker["image"]}, torch.device("cpu"), cfg, manifest, train)
        torch.manual_seed(0)
        b = prepare({"label": torch.zeros(8), "key": [], **jpeg}, torch.device("cpu"), cfg, manifest, train)
        assert torch.equal(a["image"], b["image"])


def test_an_empty_fold_is_refused_before_any_training(quirky, tmp_path, capsys):
    from fer_dist.cli import main

    fold = quirky.manifest.videos["3-30-640x360"].fold
    assert quirky.manifest.groups[fold].samples == 0
    assert "its videos (3-30-640x360)" in warning(quirky, f"{fold} holds no samples")
    run = tmp_path / "run"
    args = ["--config", "mfm_cpu", f"data.shards={quirky.shards}", f"data.holdout_fold={fold[4:]}"]
    assert main(["train", *args, f"train.run_dir={run}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"data.holdout_fold={fold[4:]}: {fold} holds no samples" in err and "3-30-640x360" in err
    assert not run.exists()
    cv = tmp_path / "cv"
    assert main(["cv", "--config", "mfm_cpu", "--cv-dir", str(cv), f"data.shards={quirky.shards}"]) == 2
    assert f"{fold} holds no samples" in " ".join(capsys.readouterr().err.split())
    assert not list(cv.glob("fold*"))


def test_training_evaluation_and_prediction_on_quirky_footage(quirky, tmp_path, capsys):
    """A tiny run with a loader worker on the quirky shards: it trains on crops of every size and
    scores the fold without Fear, warning that Fear's F1 counts as 0; then the submission for the
    test videos has one line per frame of each (their containers state no count), and a template
    the shards cannot fill is refused before anything is written."""
    from fer_dist.cli import main
    from fer_dist.jobs.predict import predict
    from fer_dist.results.submission import SubmissionError

    fold = quirky.manifest.videos["8-30-640x360"].fold
    run = tmp_path / "run"
    overrides = tiny_run(quirky.shards, run, f"data.holdout_fold={fold[4:]}", "data.workers=1")
    assert main(["train", "--config", "mfm_cpu", *overrides]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: {fold} has no Fear frames: macro-F1 counts their F1 as 0" in err
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["absent_classes"] == ["Fear"] and metrics["eval_frames"] == quirky.manifest.groups[fold].samples

    out = tmp_path / "submit"
    predict([str(run)], quirky.shards, out, template=quirky.data / TEST_TEMPLATE)
    rows = (out / "submission" / "abaw5.csv").read_text().splitlines()[1:]
    for name in ("9-30-640x360", "10-30-640x360"):
        frames = len(decoded_times(quirky.videos[name].media))
        lines = (out / "submission" / "abaw3" / f"{name}.txt").read_text().splitlines()
        assert len(lines) == 1 + frames and sum(r.startswith(f"{name}/") for r in rows) == frames

    template = tmp_path / "template.csv"
    template.write_text((quirky.data / TEST_TEMPLATE).read_text() + "9-30-640x360/09999.jpg,\n")
    refused = tmp_path / "refused"
    with pytest.raises(SubmissionError, match=r"cannot give 1 required frame\(s\), e.g. 9-30-640x360/09999"):
        predict([str(run)], quirky.shards, refused, template=template)
    assert not refused.exists()
