"""Shared fixtures: one small synthetic dataset and its shards, made once per test session."""

from __future__ import annotations

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
