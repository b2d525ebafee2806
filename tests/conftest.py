"""Shared fixtures: one small synthetic dataset and its shards, made once per test session."""

from __future__ import annotations

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
