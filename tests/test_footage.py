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

from fer_dist.data.packing.audio import read_media
from fer_dist.data.packing.layout import discover, list_crops, read_annotation
from fer_dist.data.packing.synth import TEST_LIST, TEST_TEMPLATE, synthesize
from fer_dist.data.shards.format import SampleMeta, read_manifest
from fer_dist.data.shards.windows import SILENCE
from fer_dist.models.contract import IMAGENET
from helpers import REPO, by_video, remux, tiny_run

pytestmark = pytest.mark.slow  # the module packs its own dataset once
QUIET = float(np.float16(SILENCE))  # a silent log-mel column as the shards store it
LOUD = -5.0  # a log-mel column above this holds the tone


def write_video(path: Path, times: list[float], sound: list[tuple[float, np.ndarray]] | None = None, rate=16000):
    """64 x 64 H.264 frames shown at `times` (s); AAC sound from each (start s, samples [channels,
    n]) segment of `sound`, at `rate` Hz (1 channel: mono, 6: 5.1); `[]`: an audio stream without a
    packet. Matroska when `path` ends in .mkv."""
    tb = Fraction(1, 1000) if path.suffix == ".mkv" else Fraction(1, 30000)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width = video.height = 64
        video.pix_fmt, video.time_base = "yuv420p", tb
        layout = {1: "mono", 6: "5.1"}[len(sound[0][1]) if sound else 1]
        audio = out.add_stream("aac", rate=rate, layout=layout) if sound is not None else None
        for t in times:
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / tb), tb
            out.mux(video.encode(frame))
        out.mux(video.encode())
        for start, samples_ in sound or []:
            for s in range(0, samples_.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples_[:, s : s + 1024]), "fltp", layout)
                frame.sample_rate, frame.pts = rate, s + round(start * rate)
                out.mux(audio.encode(frame))
        if audio is not None and sound:
            out.mux(audio.encode())


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    return np.repeat((0.3 * np.sin(np.arange(round(seconds * rate)) * 0.2)).astype(np.float32)[None], channels, 0)


def decoded_times(path: Path) -> list[Fraction]:
    """Each frame's presentation time as PyAV's decoder gives it: the truth the tests hold to."""
    with av.open(str(path)) as container:
        return [Fraction(f.pts) * f.time_base for f in container.decode(video=0)]


def sound_seconds(path: Path) -> tuple[float, float]:
    """Where the decoded sound starts and ends (s)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(audio=0))
    last = frames[-1]
    return float(frames[0].pts * frames[0].time_base), float(
        last.pts * last.time_base
    ) + last.samples / last.sample_rate


def frames_before_damage(path: Path) -> int:
    """The frames PyAV decodes from a damaged file before it stops."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
    except av.error.FFmpegError:
        pass
    return count


def truncate(path: Path, root: Path, share: float = 0.6) -> None:
    """The file with its index first (as a streaming upload has it), cut off at `share` of its bytes."""
    remux(path, root / "faststart.mp4", format="mp4", options={"movflags": "faststart"})
    data = (root / "faststart.mp4").read_bytes()
    path.write_bytes(data[: int(len(data) * share)])


def stall(n: int, after: dict[int, float]) -> list[float]:
    """n frames at 30 fps, paused for `after[k]` s after frame k (1-based)."""
    return [i / 30 + sum(pause for k, pause in after.items() if i >= k) for i in range(n)]


def crop_size(k: int) -> tuple[int, int]:
    """Crop k's own (width, height) px: no two crops of the video share a size."""
    return 40 + k, 40 + (13 * k) % 200


@pytest.fixture(scope="module")
def quirky(tmp_path_factory) -> SimpleNamespace:
    """Nine labelled videos in nine folds (one parent video each) and three test videos, each
    edited to carry its quirks, packed with `fer-dist shard --audio-wave`."""
    root = tmp_path_factory.mktemp("quirky")
    data = root / "data"
    synthesize(data, 9, seed=1, workers=2, length=300, test_videos=3)
    videos = {v.name: v for v in discover(data, test_list=data / TEST_LIST)}
    length = {n: len(read_annotation(v.annotation)) for n, v in videos.items() if v.annotation}
    labelled = {n: np.flatnonzero(read_annotation(v.annotation) >= 0) + 1 for n, v in videos.items() if v.annotation}

    left = videos["1-30-640x360_left"]  # a BOM and CRLF line ends; greyscale and CMYK crops
    lines = left.annotation.read_text().splitlines()
    left.annotation.write_bytes("\ufeff".encode() + "\r\n".join(lines).encode() + b"\r\n")
    for k, path in enumerate(sorted(left.crops.glob("*.jpg"))[:40]):
        Image.open(path).convert("L" if k % 2 else "CMYK").save(path, quality=90)
    right = videos["1-30-640x360_right"]  # every crop its own size, as in the organisers' `cropped/`
    for k, path in enumerate(sorted(right.crops.glob("*.jpg"))):
        Image.open(path).resize(crop_size(k)).save(path, quality=90)
    left.media.unlink()  # their video: Matroska with an audio stream that holds no sound
    write_video(left.media.with_suffix(".mkv"), stall(length[left.name], {}), sound=[])
    avi = videos["2-25-640x360"]  # an annotation 40 lines longer than its video
    avi.annotation.write_text(avi.annotation.read_text() + "4\n" * 40)
    shutil.rmtree(videos["3-30-640x360"].crops)  # no face found: its fold is left empty

    n = length["4-30-640x360"]  # a 3 s stall after frame 166; sound only while frames 167-200 show
    times = stall(n, {166: 3.0})
    sound = np.zeros((1, round((times[-1] + 1) * 16000)), np.float32)
    sound[:, round(times[166] * 16000) : round((times[199] + 1 / 30) * 16000)] = 0.3
    sound *= np.sin(np.arange(sound.shape[1]) * 0.2)
    write_video(videos["4-30-640x360"].media, times, [(0.0, sound)])
    short = videos["5-30-640x360"]  # 20 ms of sound; crops as PNG files, and PNG data named .jpg
    write_video(short.media, stall(length[short.name], {}), [(0.0, tone(0.02, 44100))], rate=44100)
    for f in labelled[short.name][100:110].tolist():
        path = short.crops / f"{f:05d}.jpg"
        if path.exists():
            Image.open(path).save(path.with_suffix(".png"))
            path.unlink()
    for f in labelled[short.name][120:125].tolist():
        path = short.crops / f"{f:05d}.jpg"
        if path.exists():
            Image.open(path).save(path, format="PNG")
    n = length["6-25-640x360"]  # 5.1 sound at 48 kHz for 1 s, none for 1 s (a recorder's gap), 1 s more
    gapped = [(0.0, tone(1.0, 48000, channels=6)), (2.0, tone(1.0, 48000, channels=6))]
    write_video(videos["6-25-640x360"].media, stall(n, {}), gapped, rate=48000)

    mkv = videos["7-30-640x360"]  # Matroska (no frame count), stalls of 1.5 s and 0.7 s, tone in frames 80-120
    n = length[mkv.name]
    times = stall(n, {60: 1.5, 150: 0.7})
    sound = np.zeros((1, round((times[-1] + 1) * 8000)), np.float32)
    sound[:, round(times[79] * 8000) : round((times[119] + 1 / 30) * 8000)] = 0.3
    sound *= np.sin(np.arange(sound.shape[1]) * 0.2)
    mkv.media.unlink()
    write_video(mkv.media.with_suffix(".mkv"), times, [(0.0, sound)], rate=8000)

    late = videos["8-30-640x360"]  # the sound starts 3 s late and stops 2 s early; no Fear frame
    n = length[late.name]
    write_video(late.media, stall(n, {}), [(3.0, tone(n / 30 - 5, 16000))])
    header, *labels = late.annotation.read_text().splitlines()
    late.annotation.write_text("\n".join([header, *("0" if x == "3" else x for x in labels)]) + "\n")
    truncate(videos["9-30-640x360"].media, root)  # cut off at 60 %, as a broken download

    test = videos["10-30-640x360"]  # a fragmented MP4: no frame count in its header; no face in the last 14 frames
    remux(test.media, root / "frag.mp4", format="mp4", options={"movflags": "frag_keyframe+empty_moov"})
    shutil.move(root / "frag.mp4", test.media)
    for path in sorted(test.crops.glob("*.jpg"))[-14:]:
        path.unlink()
    test = videos["11-30-640x360"]  # Matroska; crops of every size, none in the last 10 frames, 5 past its end
    frames = len(decoded_times(test.media))
    remux(test.media, test.media.with_suffix(".mkv"))
    test.media.unlink()
    crops = sorted(test.crops.glob("*.jpg"))
    for path in crops[-10:]:
        path.unlink()
    for k, path in enumerate(crops[:-10]):
        Image.open(path).resize(crop_size(k)).save(path, quality=90)
    for f in range(frames + 1, frames + 6):
        shutil.copy(crops[0], test.crops / f"{f:05d}.jpg")
    truncate(videos["12-30-640x360"].media, root)  # a test video cut off at 60 %: its header still counts

    shards = root / "shards"
    cmd = [sys.executable, "-m", "fer_dist.cli", "shard", "--root", str(data), "--out", str(shards)]
    cmd += ["--test-list", str(data / TEST_LIST), "--n-folds", "9", "--samples-per-shard", "200", "--audio-wave"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(shards)
    packed = by_video(shards, ("mel", "wave"), ("jpg",))
    videos = {v.name: v for v in discover(data, test_list=data / TEST_LIST)}
    return SimpleNamespace(data=data, shards=shards, result=result, manifest=manifest, samples=packed, videos=videos)


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
    assert record.audio and q.audio_s < 0.1 and q.frames_after_sound == q.video_frames - 1
    assert all(s["mel"][:, 32].max() == QUIET for f, s in quirky.samples[name].items() if f > 5)
    line = warning(quirky, f"{name}:", "ends")
    assert f"the sound ({q.audio_s:.2f} s of it) ends" in line


def test_crops_that_are_not_jpeg_are_counted_and_named(quirky):
    """PNG files, and PNG data under a .jpg name: never packed (shards hold the crops' JPEG bytes
    as they are), their frames filled from the nearest crop, the cause named."""
    name = "5-30-640x360"
    record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
    assert q.not_jpeg_crops == 15 and record.corrupt_crops == 5 and record.samples == record.labelled
    assert record.filled >= 15
    assert "convert them to JPEG" in warning(quirky, f"{name}:", "15 crop file(s) are not JPEG")


def test_sound_with_a_gap_that_ends_early_keeps_its_time_and_no_pad_exceeds_the_window(quirky):
    """5.1 sound at 48 kHz: 1 s, then no packets for 1 s, then 1 s more, then nothing: the second
    second of sound is heard by the frames shown then (silence put into the gap), and the frames
    after its end are counted and hear silence."""
    name = "6-25-640x360"
    q = quirky.manifest.videos[name].quality
    _, end = sound_seconds(quirky.videos[name].media)
    times = decoded_times(quirky.videos[name].media)
    assert q.frames_after_sound == sum(float(t) >= end for t in times) and q.frames_before_sound == 0
    assert q.audio_early_end_s == pytest.approx(float(times[-1]) - end, abs=1e-3)
    assert q.sound_gaps_s == pytest.approx(1.0, abs=0.05) and q.audio_s == pytest.approx(2.0, abs=0.1)
    loud, packed = set(loud_frames(quirky, name)), set(quirky.samples[name])
    assert {f for f in packed if 3 <= f <= 28 or 64 <= f <= 88} <= loud  # t in [0, 1) s and [2, 3) s
    assert not loud & {f for f in packed if 34 <= f <= 57 or f >= 95}
    for video in quirky.samples.values():  # every sample of every video
        for s in video.values():
            before, after = s["meta"].pad
            assert 0 <= before <= 64 and 0 <= after <= 64 and before + after <= 64
    for f, s in quirky.samples[name].items():
        if float(times[f - 1]) > end + 33 / 30:  # the whole window after the sound
            assert s["meta"].pad == [0, 64] and s["mel"].max() == QUIET and not s["wave"].any()
    assert f"the {q.frames_after_sound} frame(s) after it hear silence" in warning(quirky, f"{name}:", "ends")
    assert "jump ahead by 1.0" in warning(quirky, f"{name}:", "jump ahead")


def test_a_rate_asked_for_twice_fills_each_gap_once(tmp_path):
    """`--sample-rate 16000 --audio-wave`: the log-mel's audio and the waveform share one rate; the
    silence put into a gap in the sound is put once, so the sound after it keeps its time."""
    path = tmp_path / "gap.mp4"
    write_video(path, [i / 30 for i in range(90)], [(0.0, tone(1.0, 16000)), (2.0, tone(1.0, 16000))])
    alone, twice = read_media(path, 16000), read_media(path, 16000, also=(16000,))
    assert alone.sound_gaps == pytest.approx(1.0, abs=0.05) and twice.sound_gaps == alone.sound_gaps
    assert np.array_equal(twice.audio, alone.audio) and np.array_equal(twice.resampled[16000], alone.audio)
    assert len(alone.audio) / 16000 == pytest.approx(3.0, abs=0.1)  # 1 s, 1 s of silence, 1 s


def test_sound_that_starts_late_and_ends_early_counts_each(quirky):
    name = "8-30-640x360"
    q = quirky.manifest.videos[name].quality
    start, end = sound_seconds(quirky.videos[name].media)
    times = [float(t) for t in decoded_times(quirky.videos[name].media)]
    assert start == pytest.approx(3.0, abs=0.1) and q.audio_late_s == pytest.approx(start, abs=1e-3)
    assert q.frames_before_sound == sum(t < start for t in times) and q.frames_before_sound > 80
    assert q.frames_after_sound == sum(t >= end for t in times) and q.frames_after_sound > 50
    assert all(s["mel"][:, 32].max() == QUIET for f, s in quirky.samples[name].items() if f <= 85)
    assert all(s["meta"].pad[0] == 64 for f, s in quirky.samples[name].items() if f <= 50)
    late = warning(quirky, f"{name}:", "starts")
    assert f"starts {q.audio_late_s:.2f} s after the first frame; the {q.frames_before_sound} frame(s)" in late
    assert f"the {q.frames_after_sound} frame(s) after it" in warning(quirky, f"{name}:", "ends")


def test_an_audio_stream_without_sound_is_no_sound(quirky):
    for name in ("1-30-640x360_left", "1-30-640x360_right"):  # one Matroska file
        record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
        assert not record.audio and q.empty_audio and q.frames_after_sound == q.frames_before_sound == 0
        assert all(not s["meta"].audio and s["mel"].max() == QUIET for s in quirky.samples[name].values())
        assert "packed silent" in warning(quirky, f"{name}:", "holds no sound")
    assert name in quirky.manifest.totals.videos_without_audio


def test_labels_past_the_end_of_the_video_are_kept_filled_silent_and_counted(quirky):
    name = "2-25-640x360"  # an .avi
    record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
    frames = len(decoded_times(quirky.videos[name].media))
    assert q.video_frames == frames == q.header_frames and q.labels_past_end == 40
    assert record.frames == frames + 40 and record.samples == record.labelled
    past = {f: s for f, s in quirky.samples[name].items() if f > frames}
    assert len(past) == 40
    for s in past.values():
        assert s["meta"].filled_from is not None and s["meta"].filled_from <= frames
        assert s["mel"][:, 32].max() == QUIET and not s["wave"].any() and s["meta"].pad[1] >= 32
    assert "40 label(s) past the video's last frame" in warning(quirky, f"{name}:", "past")


def test_a_damaged_file_keeps_what_precedes_the_damage(quirky):
    """A file cut off part way (a broken download): the frames and sound before the cut are
    packed (up to the last picture, a frame shown before it whose packet lay past the cut counted
    lost), the labels after it are kept as labels past the end; a test video's submission still
    counts the frames its header states."""
    name = "9-30-640x360"
    record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
    decoded = frames_before_damage(quirky.videos[name].media)
    assert 0 < q.video_frames == decoded + q.frames_lost < q.header_frames and q.damage and record.audio
    assert q.frames_lost <= 2 and q.labels_past_end == record.frames - q.video_frames
    assert record.samples == record.labelled
    assert f"cut off or damaged after frame {q.video_frames}" in warning(quirky, f"{name}:", "damaged")
    test = "12-30-640x360"
    record, q = quirky.manifest.videos[test], quirky.manifest.videos[test].quality
    assert q.frames_from == "header" and record.frames == record.samples == q.header_frames > q.video_frames
    assert "the submission counts the header's" in warning(quirky, f"{test}:", "damaged")


def test_a_container_without_a_frame_count_is_counted_by_decoding(quirky):
    """Test videos in a fragmented MP4 and in Matroska (no frame count in the header), their last
    frames without a crop, the second with crops numbered past its end: every frame of the video is
    packed, the count from decoding, and no more."""
    for name in ("10-30-640x360", "11-30-640x360"):
        record, q = quirky.manifest.videos[name], quirky.manifest.videos[name].quality
        frames = len(decoded_times(quirky.videos[name].media))
        assert q.header_frames == 0 and q.video_frames == record.frames == record.samples == frames
        assert sorted(quirky.samples[name]) == list(range(1, frames + 1))
        assert "decoding counts" in warning(quirky, f"{name}:", "no frame count")
    assert quirky.manifest.videos["11-30-640x360"].quality.crops_past_end == 5
    assert "5 crop file(s) are numbered past" in warning(quirky, "11-30-640x360:", "not packed")


def test_crops_of_any_size_and_colour_model_are_packed_and_reported(quirky):
    right = quirky.manifest.videos["1-30-640x360_right"]
    sizes = [crop_size(k) for k in range(len(list_crops(quirky.videos["1-30-640x360_right"].crops)))]
    assert right.quality.crop_width == [min(w for w, _ in sizes), max(w for w, _ in sizes)]
    assert right.quality.crop_height == [min(h for _, h in sizes), max(h for _, h in sizes)]
    assert right.corrupt_crops == 0 and right.samples == right.labelled
    assert "loader workers bring a batch" in warning(quirky, "crops of varying size")
    left = quirky.manifest.videos["1-30-640x360_left"]  # greyscale and CMYK crops, a BOM and CRLF ends
    assert left.corrupt_crops == 0 and left.samples == left.labelled and left.quality.crop_width == [112, 112]
    labels = {f: s["meta"].label for f, s in quirky.samples["1-30-640x360_left"].items()}
    truth = read_annotation(quirky.videos["1-30-640x360_left"].annotation)
    assert labels == {f + 1: int(v) for f, v in enumerate(truth) if v >= 0}
    rows = {r["video"]: r for r in json.loads(inspect_json(quirky.shards))["quality"]}
    assert set(rows) == set(quirky.manifest.videos)  # every video of this set has something to look at
    assert rows["4-30-640x360"]["found"][0].startswith("variable frame rate")
    assert rows["10-30-640x360"]["quality"]["header_frames"] == 0
    assert rows["10-30-640x360"]["quality"]["video_frames"] == quirky.manifest.videos["10-30-640x360"].frames
    assert f"data quality: {len(rows)} of {len(rows)} videos to look at" in quirky.result.stdout


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
    from fer_dist.data.stream import decode, transport
    from fer_dist.data.stream.transforms import decode_on, prepare

    crops = [s["jpg"] for s in list(quirky.samples["1-30-640x360_right"].values())[:8]]
    assert len({Image.open(io.BytesIO(c)).size for c in crops}) == 8
    meta = SampleMeta("v", 1, 0, "train", "fold0", 30.0, {}, True, [0, 0], None)
    raw = [{"__key__": f"v/{k:05d}", "label": 0, "clip": 0, "jpg": c, "meta": meta} for k, c in enumerate(crops)]
    in_worker = transport.as_tensors(
        transport.collate([decode.decode_frame(r, ("image",)) for r in raw], image_size=48)
    )
    on_device = decode_on([torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in crops], torch.device("cpu"), 48)
    assert in_worker["image"].shape == (8, 3, 48, 48) and torch.equal(in_worker["image"], on_device)
    cfg, manifest = DataConfig(shards=str(quirky.shards), image_size=48), quirky.manifest
    jpeg = {"jpeg": torch.from_numpy(np.concatenate([np.frombuffer(c, np.uint8) for c in crops]))}
    jpeg["jpeg_lengths"] = torch.tensor([len(c) for c in crops])
    for train in (False, True):
        torch.manual_seed(0)
        a = prepare(
            {"label": torch.zeros(8), "image": in_worker["image"]}, torch.device("cpu"), cfg, manifest, train, IMAGENET
        )
        torch.manual_seed(0)
        b = prepare({"label": torch.zeros(8), "key": [], **jpeg}, torch.device("cpu"), cfg, manifest, train, IMAGENET)
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
    assert "hold out another fold" in err and not run.exists()
    cv = tmp_path / "cv"
    assert main(["cv", "--config", "mfm_cpu", "--cv-dir", str(cv), f"data.shards={quirky.shards}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{fold} holds no samples" in err and "pack with fewer --n-folds" in err
    assert not list(cv.glob("fold*"))


def test_training_evaluation_and_prediction_on_quirky_footage(quirky, tmp_path, capsys):
    """A tiny run with a loader worker on the quirky shards: it trains on crops of every size and
    scores the fold without Fear, warning that Fear's F1 counts as 0; then the submission for the
    test videos has one line per frame of each (their containers state no count; the damaged one's
    header does), a template row past a video's end takes its last frame's label, and what cannot
    be given (a video the shards do not hold, a run that is not there) is refused before anything
    is written."""
    from fer_dist.cli import main
    from fer_dist.jobs.predict import predict
    from fer_dist.results.ensemble import EnsembleError
    from fer_dist.results.submission import SubmissionError

    fold = quirky.manifest.videos["8-30-640x360"].fold
    run = tmp_path / "run"
    overrides = tiny_run(quirky.shards, run, f"data.holdout_fold={fold[4:]}", "data.workers=1")
    assert main(["train", "--config", "mfm_cpu", *overrides]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: {fold} has no Fear frames: macro-F1 counts their F1 as 0" in err
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["absent_classes"] == ["Fear"] and metrics["eval_frames"] == quirky.manifest.groups[fold].samples

    template = tmp_path / "template.csv"  # one row past the end of a video, as annotation files often have
    last = quirky.manifest.videos["10-30-640x360"].frames
    template.write_text((quirky.data / TEST_TEMPLATE).read_text() + f"10-30-640x360/{last + 1:05d}.jpg,\n")
    out = tmp_path / "submit"
    predict([str(run)], quirky.shards, out, template=template)
    assert "1 template row(s) lie past their video's last frame" in " ".join(capsys.readouterr().err.split())
    rows = dict(r.split(",") for r in (out / "submission" / "abaw5.csv").read_text().splitlines()[1:])
    for name in ("10-30-640x360", "11-30-640x360", "12-30-640x360"):
        frames = quirky.manifest.videos[name].frames
        lines = (out / "submission" / "abaw3" / f"{name}.txt").read_text().splitlines()
        assert len(lines) == 1 + frames and all(f"{name}/{f:05d}.jpg" in rows for f in range(1, frames + 1))
    assert rows[f"10-30-640x360/{last + 1:05d}.jpg"] == rows[f"10-30-640x360/{last:05d}.jpg"]

    template.write_text((quirky.data / TEST_TEMPLATE).read_text() + "no-such-video/00001.jpg,\n")
    refused = tmp_path / "refused"
    with pytest.raises(SubmissionError, match=r"cannot give 1 required frame.*not among the test videos"):
        predict([str(run)], quirky.shards, refused, template=template)
    with pytest.raises(EnsembleError, match="no-run: no such folder"):
        predict([str(tmp_path / "no-run")], quirky.shards, refused)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(EnsembleError, match="unfinished: no finished training run there"):
        predict([str(tmp_path / "unfinished")], quirky.shards, refused)
    assert not refused.exists()
