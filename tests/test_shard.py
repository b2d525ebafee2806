import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import pytest

from fer_dist.data.packing.audio import frame_columns, frame_times, log_mel, read_media, seconds, window
from fer_dist.data.packing.layout import discover, list_crops, read_annotation
from fer_dist.data.shards.format import MelParams, SampleMeta, claim, is_shard_name, read_manifest
from fer_dist.data.shards.survey import compare, survey
from fer_dist.data.shards.windows import purity_flags
from fer_dist.errors import InputError
from helpers import samples


def test_every_labelled_frame_exactly_once(synthetic, shards):
    expected = Counter()
    for v in discover(synthetic):
        labels = read_annotation(v.annotation)
        expected.update({f"{v.name}/{i + 1:05d}": int(c) for i, c in enumerate(labels) if c >= 0})
    keys = [s["__key__"] for s in samples(shards)]
    assert len(keys) == len(set(keys)) == len(expected)
    got = {s["__key__"]: int(s["cls"]) for s in samples(shards)}
    assert got == dict(expected)
    assert min(got.values()) >= 0


def test_inspect_counts_equal_annotations(synthetic, shards):
    manifest = read_manifest(shards)
    found = survey(shards, manifest.params.sample_members())
    assert not found["problems"]
    assert compare(found, manifest) == []
    for v in discover(synthetic):
        labels = read_annotation(v.annotation)
        assert found["videos"][v.name]["class_counts"] == np.bincount(labels[labels >= 0], minlength=8).tolist()


def test_crops_are_byte_identical_or_filled_from_nearest(synthetic, shards):
    crops = {v.name: list_crops(v.crops) for v in discover(synthetic)}
    filled = 0
    for s in samples(shards):
        meta = SampleMeta.from_bytes(s["json"])
        video, frame = meta.video, meta.frame
        if meta.filled_from is None:
            assert s["jpg"] == crops[video][frame].read_bytes()
        else:
            filled += 1
            src = meta.filled_from
            assert frame not in crops[video]
            assert s["jpg"] == crops[video][src].read_bytes()
            nearest = min(crops[video], key=lambda f: (abs(f - frame), f))
            assert src == nearest
    assert filled == read_manifest(shards).totals.filled > 0


def test_left_right_share_a_fold(shards):
    videos = read_manifest(shards).videos
    left = next(n for n in videos if n.endswith("_left"))
    assert videos[left].fold == videos[left.replace("_left", "_right")].fold
    parents = {}
    for r in videos.values():
        assert parents.setdefault(r.parent, r.fold) == r.fold


def test_window_flags_and_mel_windows(synthetic, shards):
    v = next(v for v in discover(synthetic) if v.media.suffix == ".avi")
    labels = read_annotation(v.annotation)
    flags = purity_flags(labels)
    p = MelParams()
    media = read_media(v.media, p.sample_rate)
    columns = frame_columns(log_mel(media.audio, p), seconds(frame_times(media, len(labels))), len(labels), p)
    checked = 0
    for s in samples(shards):
        meta = SampleMeta.from_bytes(s["json"])
        if meta.video != v.name:
            continue
        f = meta.frame
        assert [meta.windows[k] for k in "sml"] == flags[f - 1].tolist()
        mel = np.load(io.BytesIO(s["mel.npy"]), allow_pickle=False)
        assert mel.dtype == np.float16 and mel.shape == (128, 64)
        np.testing.assert_allclose(mel, window(columns, f).astype(np.float16), atol=1e-2)
        checked += 1
    assert checked == int((labels >= 0).sum())


def test_the_waveform_member_is_the_decoded_16khz_audio_at_its_samples(synthetic, wave_shards):
    """`--audio-wave`: each sample's `wav.npy` is the video's audio decoded and resampled to
    16 kHz, as 16-bit PCM, over the 2 x 17,067 samples (+-32 frames at 30 fps) centred on the
    frame's time (its timestamp, decoded here by PyAV; (i - 1) / fps in these constant-rate
    videos); silence beyond the audio and for the video without sound. Format 2 says so."""
    manifest = read_manifest(wave_shards)
    assert manifest.format == 2 and manifest.members == ["image", "audio", "wave"]
    assert compare(survey(wave_shards, manifest.params.sample_members()), manifest) == []
    audio = {}
    for v in discover(synthetic):
        media = read_media(v.media, 16000)
        pcm = None if media.audio is None else np.clip(np.round(media.audio * 32767), -32768, 32767).astype(np.int16)
        with av.open(str(v.media)) as container:
            times = [Fraction(f.pts) * f.time_base for f in container.decode(video=0)]
        assert times == [Fraction(i) / media.fps for i in range(len(times))]
        audio[v.name] = (times, pcm)
    checked, edges, silent = 0, 0, 0
    for s in samples(wave_shards):
        meta = SampleMeta.from_bytes(s["json"])
        times, pcm = audio[meta.video]
        wave = np.load(io.BytesIO(s["wav.npy"]), allow_pickle=False)
        assert wave.dtype == np.int16 and wave.shape == (34134,)
        if pcm is None:
            assert not wave.any()
            silent += 1
            continue
        start = round(times[meta.frame - 1] * 16000) - 17067
        expected = np.zeros(34134, np.int16)
        lo, hi = max(0, start), min(len(pcm), start + 34134)
        expected[lo - start : hi - start] = pcm[lo:hi]
        np.testing.assert_array_equal(wave, expected)
        checked += 1
        edges += start < 0 or start + 34134 > len(pcm)
    assert checked > 1000 and edges > 0 and silent > 0


def test_video_without_audio_is_marked(shards):
    manifest = read_manifest(shards)
    silent = manifest.totals.videos_without_audio
    assert len(silent) == 1
    assert manifest.videos[silent[0]].audio is False


def test_shards_are_clips_of_consecutive_frames(shards):
    first = next(iter(sorted(shards.glob("fold*.tar"))))
    with tarfile.open(first) as tar:
        keys = [m.name.split(".")[0] for m in tar if m.name.endswith(".cls")]
    consecutive = sum(
        a.split("/")[0] == b.split("/")[0] and int(b.split("/")[1]) == int(a.split("/")[1]) + 1
        for a, b in zip(keys, keys[1:], strict=False)
    )
    assert consecutive > 0.7 * len(keys)
    assert len({k.split("/")[0] for k in keys}) > 1  # clips of several videos shuffled together


def test_inspect_command_reads_the_tars(shards, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fer_dist.cli", "inspect", str(shards), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["agrees"] and report["samples"] == read_manifest(shards).totals.samples
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = sorted(copy.glob("fold1-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated shard
    result = subprocess.run(
        [sys.executable, "-m", "fer_dist.cli", "inspect", str(copy)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert f"shard {victim.name}: manifest" in result.stdout and "disagree" in result.stdout


def test_the_manifest_does_not_depend_on_the_order_videos_finished_in():
    """Resumed packing finishes videos in another order; float sums must not see it."""
    import itertools

    from fer_dist.data.packing.pack import MelSums, manifest_of
    from fer_dist.data.shards.format import PackParams, Quality, VideoRecord

    def record(fold: str) -> VideoRecord:
        counts = [1, 0, 0, 0, 0, 0, 0, 1]
        return VideoRecord(
            split="train", fold=fold, parent="p", fps=30.0, fps_source="container", frames=2,
            audio=True, audio_error=None, labelled=2, with_crop=2, with_crop_class_counts=counts,
            samples=2, filled=0, corrupt_crops=0, dropped={f"reason of {fold}": 1}, class_counts=counts,
            labelled_class_counts=counts, window_counts=[2, 2, 2], window_patterns=[[1, 1]],
            quality=Quality(
                video_frames=2, header_frames=2, timing="timestamps", timing_drift_s=0.0, audio_s=1.0,
                audio_late_s=0.0, audio_early_end_s=0.0, labels_past_end=0,
                crop_width=[112, 112], crop_height=[112, 112],
            ),
        )  # fmt: skip

    sums = {"a": 1e16, "b": 1.0, "c": -1e16, "d": 0.1}  # naive float sums of these depend on the order
    shards = {
        "fold0": [{"name": "fold0-000000.tar", "samples": 4}],
        "fold1": [{"name": "fold1-000000.tar", "samples": 4}],
    }
    written = set()
    for order in itertools.permutations(sums):
        records = {v: record(f"fold{i % 2}") for i, v in enumerate(sorted(sums))}
        mel = {v: MelSums(mel_sum=sums[v], mel_sumsq=abs(sums[v]), mel_count=4) for v in order}
        records = {v: records[v] for v in order}
        written.add(manifest_of(records, mel, shards, PackParams()).to_json())
    assert len(written) == 1
    assert json.loads(written.pop())["mel_stats"]["mean"] == 1.1 / 16  # exactly rounded


def test_shards_without_waveforms_stay_format_1_and_an_unknown_format_is_refused(shards, tmp_path):
    import pytest

    from fer_dist.data.shards.format import ManifestError

    manifest = read_manifest(shards)
    assert manifest.format == 1 and manifest.members == ["image", "audio"] and not manifest.params.audio_wave
    raw = json.loads((shards / "manifest.json").read_text())
    assert "tracks" not in raw and manifest.tracks == ["expr"]  # format 1 holds the expression track alone
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, "format": 4}))
    with pytest.raises(ManifestError, match=r"format 4, this fer-dist reads \(1, 2, 3\); repack"):
        read_manifest(tmp_path)


def test_the_shard_command_packs_the_waveforms_when_asked(synthetic, wave_shards, tmp_path):
    from fer_dist.cli import main

    out = tmp_path / "shards"
    args = ["shard", "--root", str(synthetic), "--out", str(out), "--samples-per-shard", "150", "--audio-wave"]
    assert main(args) == 0
    assert (out / "manifest.json").read_bytes() == (wave_shards / "manifest.json").read_bytes()
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in wave_shards.glob("*.tar"))


def test_unfinished_work_of_other_inputs_starts_over_and_another_commands_is_refused(tmp_path, capsys):
    """`claim` on a folder holding the scratch of a run that stopped: of the same stamp it is
    resumed, kept; of the same command with other inputs (mended since) it is removed, shards begun
    and all, and started over, said so; of another command, or unreadable, it is refused; what is
    not the command's (a file of another name) is left alone."""
    out, old, new = tmp_path / "out", {"inputs": "a", "videos": ["v"]}, {"inputs": "b", "videos": ["v"]}

    def scratch(recorded: bytes) -> None:
        (out / ".work").mkdir(parents=True, exist_ok=True)
        (out / ".work" / "stamp.json").write_bytes(recorded)
        for name in (".work/v.json", ".work/v.tar", "fold0-000000.tar", "test-000001.tar.tmp", "notes.txt"):
            (out / name).write_bytes(b"x")

    scratch(json.dumps({"stamp": old}).encode())
    assert claim(out, "stamp", old, InputError, "shards") is None and (out / "fold0-000000.tar").exists()
    assert "starting over" not in capsys.readouterr().err  # the same stamp: resumed
    for recorded in ({"stamp": old}, old):  # as recorded now, and a stamp recorded bare, as before
        scratch(json.dumps(recorded).encode())
        assert claim(out, "stamp", new, InputError, "shards") is None
        assert "held the unfinished shards of other inputs or settings" in " ".join(capsys.readouterr().err.split())
        assert sorted(p.name for p in out.rglob("*")) == [".work", "notes.txt", "stamp.json"]
        assert json.loads((out / ".work" / "stamp.json").read_text()) == {"stamp": new}
    for recorded in (json.dumps({"extract_stamp": old}).encode(), json.dumps({"backbone": "x"}).encode(), b"\xff"):
        scratch(recorded)
        with pytest.raises(InputError, match=r"holds work begun by another command, or unreadable"):
            claim(out, "stamp", new, InputError, "shards")
        assert (out / "fold0-000000.tar").exists() and (out / ".work" / "v.json").exists()
    names = ("fold3-000012.tar", "test-000000.tar.tmp", "fold-000000.tar", "a.tar", "fold0-000000.tar.idx")
    assert [is_shard_name(n) for n in names] == [True, True, False, False, False]
