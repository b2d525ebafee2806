"""`fer-dist extract`: feature shards that mirror the source shards, written atomically, resumable."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

from fer_dist.data.packing.audio import ProsodyParams, prosody
from fer_dist.data.packing.layout import discover
from fer_dist.data.shards.format import SampleMeta, read_manifest
from fer_dist.jobs.extract import ExtractError, extract
from helpers import samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_prosody_of_a_tone():
    p = ProsodyParams()
    t = np.arange(p.sample_rate * 3) / p.sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    f = prosody(tone, np.arange(100) / 25, p)  # 4 s of video at 25 fps, 3 s of sound
    assert f.shape == (100, p.n_mfcc + 2)
    assert np.allclose(f[10:70, p.n_mfcc], 220, rtol=0.03)  # pitch, Hz
    assert np.allclose(f[10:70, p.n_mfcc + 1], np.log(0.125), atol=0.01)  # log mean square of 0.5 sin
    assert not f[80:].any()  # after the sound ends
    assert not prosody(None, np.arange(10) / 25, p).any()


def test_feature_shards_mirror_the_source(shards, features):
    source, manifest = read_manifest(shards), read_manifest(features)
    assert manifest.members == ["image", "embedding", "audio_features"]
    assert manifest.groups == source.groups
    assert sorted(p.name for p in features.glob("*.tar")) == sorted(p.name for p in shards.glob("*.tar"))
    silent = set(source.totals.videos_without_audio)
    assert silent, "the synthetic data has a video without audio"
    dim = manifest.features["embedding"]["dim"]
    for a, b in zip(samples(shards), samples(features), strict=True):  # same keys, same order
        assert a["__key__"] == b["__key__"]
        assert a["jpg"] == b["jpg"] and a["cls"] == b["cls"] and a["json"] == b["json"]
        assert set(b) == {"__key__", "jpg", "cls", "json", "emb.npy", "afeat.npy"}
        emb, aud = npy(b["emb.npy"]), npy(b["afeat.npy"])
        assert emb.shape == (dim,) and emb.dtype == np.float16 and aud.shape == (15,)
        video = json.loads(a["json"])["video"]
        assert (not aud.any()) == (video in silent)
    stats = manifest.feature_stats
    assert len(stats["embedding"].std) == dim and min(stats["audio_features"].std) > 0


def test_the_voice_feature_is_the_frozen_encoders_layers_over_the_frames_window(wave_shards, voice_features):
    """`--speech-encoder`: each frame's `voice.npy` is the encoder's layers averaged over the
    chosen window of the frame's waveform member, computed here again from the source shards."""
    import torch

    from fer_dist.data.shards.windows import PCM_SCALE, wave_span
    from fer_dist.models.speech import SpeechEncoder

    manifest = read_manifest(voice_features)
    voice = manifest.features["voice"]
    assert manifest.members == ["image", "embedding", "audio_features", "voice"]
    assert (voice["encoder"], voice["window"], voice["layers"], voice["dim"]) == ("wav2vec2_tiny", "l", 2, 64)
    assert manifest.feature_dims() == {
        "embedding_dim": 64,
        "audio_features_dim": 15,
        "voice_dim": 64,
        "voice_layers": 2,
    }
    torch.manual_seed(0)  # the random-init encoder the extraction made
    encoder = SpeechEncoder("wav2vec2_tiny").eval()
    start, length = wave_span("l")
    pairs = list(zip(samples(wave_shards), samples(voice_features), strict=True))[::97]
    waves = torch.stack([torch.from_numpy(npy(a["wav.npy"])[start : start + length]) for a, _ in pairs])
    with torch.no_grad():
        expected = encoder.layer_means(waves.float() / PCM_SCALE, torch.full((len(pairs),), length))
    for (a, b), want in zip(pairs, expected, strict=True):
        assert a["__key__"] == b["__key__"]
        got = npy(b["voice.npy"])
        assert got.shape == (2, 64) and got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def test_a_refused_extraction_writes_nothing(shards, synthetic, tmp_path):
    videos = discover(synthetic)
    with pytest.raises(ExtractError, match="1 video.* not in the dataset given"):
        extract(shards, tmp_path / "a", videos[1:], "test_convnext")
    words = tmp_path / "words"
    words.mkdir()
    for i, v in enumerate(videos[:2]):
        np.save(words / f"{v.name}.npy", np.zeros((10, 4 + i), np.float32))
    with pytest.raises(ExtractError, match=r"widths \[4, 5\]"):
        extract(shards, tmp_path / "b", videos, "test_convnext", words=words)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_voice_needs_shards_with_waveforms(shards, synthetic, tmp_path):
    with pytest.raises(ExtractError, match="--audio-wave"):
        extract(shards, tmp_path / "f", discover(synthetic), "test_convnext", speech_encoder="wav2vec2_tiny")


@pytest.mark.slow
def test_extract_resumes_after_a_kill(shards, synthetic, features, tmp_path, monkeypatch):
    import fer_dist.data.packing.features as ex

    real, done = ex.write_shard, []

    def killed_after_three(src, dst, *args):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(dst.name)
        return real(src, dst, *args)

    out = tmp_path / "features"
    monkeypatch.setattr(ex, "write_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        extract(shards, out, discover(synthetic), "test_convnext", image_size=64)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    for name in done:
        os.utime(out / name, (1, 1))
    monkeypatch.setattr(ex, "write_shard", real)
    extract(shards, out, discover(synthetic), "test_convnext", image_size=64)
    assert all((out / name).stat().st_mtime == 1 for name in done)  # kept, not rewritten
    for p in features.glob("*.tar"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == json.loads((features / "manifest.json").read_text())
    assert not (out / ".work").exists()
    with pytest.raises(ExtractError, match="other inputs or settings"):
        extract(shards, out, discover(synthetic), "test_convnext", image_size=32)


def test_extract_names_a_truncated_shard(shards, synthetic, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    victim = sorted(bad.glob("*.tar"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExtractError, match=victim.name):
        extract(bad, tmp_path / "out", discover(synthetic), "test_convnext", image_size=32)
    assert not (tmp_path / "out" / victim.name).exists()


def test_words_are_an_optional_modality(shards, synthetic, tmp_path):
    videos = read_manifest(shards).videos
    names = sorted(videos)
    words = tmp_path / "words"
    words.mkdir()
    for i, name in enumerate(names[1:], start=1):
        np.save(words / f"{name}.npy", np.full((videos[name].frames, 4), i, np.float32))
    out = tmp_path / "out"
    manifest = extract(shards, out, discover(synthetic), "test_convnext", image_size=32, words=words)
    assert manifest.members == ["image", "embedding", "audio_features", "words"]
    assert manifest.features["words"]["dim"] == 4 and manifest.features["words"]["videos_without"] == names[:1]
    for s in samples(out):
        video = SampleMeta.from_bytes(s["json"]).video
        assert (npy(s["words.npy"]) == names.index(video)).all()  # zeros for the video without words


@pytest.mark.slow
def test_shards_with_test_videos_extract_with_their_test_list(challenge, tmp_path):
    from fer_dist.data.packing.synth import TEST_LIST

    data, shards = challenge / "data", challenge / "shards"
    with pytest.raises(ExtractError, match="test videos: give --test-list"):
        extract(shards, tmp_path / "a", discover(data), "test_convnext", image_size=32)
    assert not (tmp_path / "a").exists()
    videos = discover(data, test_list=data / TEST_LIST)
    manifest = extract(shards, tmp_path / "b", videos, "test_convnext", image_size=32)
    assert manifest.groups["test"].samples == read_manifest(shards).groups["test"].samples > 0


def test_extract_finds_the_videos_with_the_folders_the_packing_preferred(synthetic, tmp_path, capsys):
    """Shards packed with `--prefer batch2` (a video file's name in batch1 and batch2): the manifest
    records it, and `fer-dist extract` without `--prefer` takes the same file, where it used to
    refuse the clash; its own `--prefer` may name the same folder otherwise but is refused when it
    takes another file than the packing took, and a recorded folder it cannot find is said to be the
    packing's."""
    from fer_dist import cli
    from fer_dist.data.packing.layout import LayoutError
    from fer_dist.jobs.extract import dataset_videos
    from helpers import clash, mirror

    root = mirror(synthetic, tmp_path / "root")
    kept, twin = clash(root, "batch1", "batch2")
    for other in [v.annotation for v in discover(root, prefer=["batch2"]) if v.parent != kept.stem]:
        other.unlink()  # the clashed video alone (its two faces): packed and extracted in seconds
    shards, out = tmp_path / "shards", tmp_path / "features"
    assert cli.main(["shard", "--root", str(root), "--out", str(shards), "--prefer", "batch2", "--n-folds", "1"]) == 0
    source = read_manifest(shards)
    assert source.prefer == ["batch2"]
    argv = ["extract", "--shards", str(shards), "--root", str(root), "--out", str(out), "--backbone", "test_convnext"]
    assert cli.main([*argv, "--image-size", "32"]) == 0, capsys.readouterr().err
    assert read_manifest(out).totals.samples == source.totals.samples
    media = {v.name: v.media for v in dataset_videos(source, shards, root) if kept.stem in (v.name, v.parent)}
    assert set(media.values()) == {twin}
    same = dataset_videos(source, shards, root, prefer=[str(root / "batch2")])  # the packing's folder by its path
    assert {v.media for v in same if v.parent == kept.stem} == {twin}
    with pytest.raises(LayoutError, match=rf"takes {kept} for .* but .* were packed from {twin} .*drop --prefer"):
        dataset_videos(source, shards, root, prefer=[str(root / "batch1")])  # features of frames not packed
    with pytest.raises(
        LayoutError, match=r"names none of the folders searched .*that .* were packed with; give --prefer"
    ):
        dataset_videos(source, shards, root, video_dirs=[root / "batch1", root / "new_vids"])
    parsed = cli.parser().parse_args([*argv, "--prefer", "batch1", "new_vids"])
    assert parsed.prefer == ["batch1", "new_vids"]
