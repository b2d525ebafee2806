"""Shared fixtures: one small synthetic dataset and its shards, made once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fer_dist.affwild2 import discover
from fer_dist.shard import PackParams, pack
from fer_dist.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
N_VIDEOS = 6
LENGTH = 320


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
def features(shards, synthetic, tmp_path_factory) -> Path:
    """Feature shards of `shards`: a tiny random-init ConvNeXt's embeddings and the audio features."""
    from fer_dist.extract import extract

    out = tmp_path_factory.mktemp("features")
    extract(shards, out, discover(synthetic), "test_convnext", image_size=64, workers=2)
    return out


def samples(shards: Path, pattern: str = "*.tar"):
    """Every sample of the matching tars as {"__key__": key, ext: bytes}, read with tarfile alone."""
    for path in sorted(shards.glob(pattern)):
        with tarfile.open(path) as tar:
            current: dict = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(m).read()
            if current:
                yield current


SWIN = "swin_tiny_patch4_window7_224"
TINY = "{embed_dim: 16, depths: [1, 1], num_heads: [1, 2], window_size: 4}"


def tiny_run(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that make configs/mfm_cpu.yaml a seconds-long run on the test shards. The
    branches are tiny Swins: layer norms only, so a step's gradients do not depend on how the
    batch is split over ranks (batch norm's statistics would)."""
    return [
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        "train.epochs=1",
        "data.epoch_samples=64",
        "data.batch_size=8",
        "data.eval_batch_size=32",
        "data.workers=0",
        "data.image_size=32",
        "data.audio_size=[32, 32]",
        f"model.image_backbone={SWIN}",
        f"model.audio_backbone={SWIN}",
        f"model.image_backbone_args={TINY}",
        f"model.audio_backbone_args={TINY}",
        "model.fusion_dim=32",
        "model.fusion_heads=2",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(processes: int, script: str | Path, *args: str, launch_file: str = "cpu.yaml") -> list[str]:
    """`accelerate launch` with one of the launch/ files, on a free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / launch_file)]
    cmd += ["--num_processes", str(processes), "--main_process_port", str(free_port()), str(script), *args]
    return cmd


def launch(
    processes: int, *args: str, script: Path = REPO / "fer_dist" / "train.py", **kw
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        launch_cmd(processes, script, *args, **kw), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def challenge(tmp_path_factory) -> Path:
    """A small challenge: 6 labelled videos in 3 folds and 2 test videos with their test list,
    template and (for scoring) labels; shards in `<root>/shards`."""
    from fer_dist.synth import TEST_LIST

    root = tmp_path_factory.mktemp("challenge")
    synthesize(root / "data", N_VIDEOS, seed=1, workers=2, length=LENGTH, test_videos=2)
    videos = discover(root / "data", test_list=root / "data" / TEST_LIST)
    pack(videos, root / "shards", PackParams(samples_per_shard=300, n_folds=3), workers=2)
    return root


def tiny_config(path: Path, shards: Path, *extra: str) -> Path:
    """configs/mfm_cpu.yaml with the tiny_run settings, as a config file of its own."""
    import yaml

    from fer_dist import config

    cfg = config.load(REPO / "configs" / "mfm_cpu.yaml", tiny_run(shards, path.parent / "unused", *extra))
    path.write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    return path
