import random

import numpy as np
import pytest
import torch

from fer_dist import balance, config
from fer_dist.augment import crop_resize_windows
from fer_dist.shard import read_manifest
from fer_dist.stream import eval_loader, train_loader


def data_cfg(shards, **kw):
    cfg = config.load(None, [f"data.shards={shards}", "data.workers=0", "data.batch_size=8", "data.shuffle_buffer=50"])
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return cfg.data


def keys_of(loader):
    return [k for b in loader for k in b["key"]]


def test_train_batches_equal_on_every_rank(shards):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=160)
    counts = []
    for rank in range(2):
        loader, n = train_loader(cfg, manifest, seed=0, epoch=0, rank=rank, world=2)
        batches = list(loader)
        counts.append(len(batches))
        assert n == 160 // (8 * 2)
        assert all(len(b["label"]) == 8 for b in batches)
    assert counts == [10, 10]


def test_train_order_is_seeded_and_changes_per_epoch(shards):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=96)

    def order(seed, epoch, rank=0):
        return keys_of(train_loader(cfg, manifest, seed=seed, epoch=epoch, rank=rank, world=2)[0])

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(0, 0, rank=1)
    holdout = {k for k in keys_of(eval_loader(cfg, manifest, "fold0", rank=0, world=1))}
    assert not holdout & set(order(0, 0))  # the held-out fold is never trained on


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_frame_once(shards, world):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, eval_batch_size=16)
    keys = []
    for rank in range(world):
        keys += keys_of(eval_loader(cfg, manifest, "fold1", rank=rank, world=world))
    assert len(keys) == len(set(keys)) == manifest["groups"]["fold1"]["samples"]


def test_target_families():
    counts = np.array([100, 25, 0, 1, 4, 16, 9, 49])
    np.testing.assert_allclose(balance.target_distribution(counts, "natural"), counts / counts.sum())
    sqrt = balance.target_distribution(counts, "sqrt")
    np.testing.assert_allclose(sqrt, np.sqrt(counts) / np.sqrt(counts).sum())
    uniform = balance.target_distribution(counts, "uniform")
    assert uniform[2] == 0 and np.allclose(uniform[counts > 0], 1 / 7)
    copies = balance.expected_copies(counts, "uniform", max_repeat=1000)
    p = counts / counts.sum()
    assert np.isclose((copies * p).sum(), 1.0)  # one copy per read sample on average
    np.testing.assert_allclose(copies * p, uniform)
    assert balance.expected_copies(counts, "uniform", max_repeat=3).max() == 3


def test_stochastic_rounding_mean():
    rng = random.Random(0)
    draws = [balance.draw_copies(1.3, rng) for _ in range(20000)]
    assert set(draws) == {1, 2}
    assert abs(np.mean(draws) - 1.3) < 0.02


def test_window_crop_resize_is_a_centre_crop():
    mel = torch.arange(64, dtype=torch.float32).repeat(2, 4, 1)  # column index as value
    window = torch.tensor([[16, 32], [0, 64]])
    out = crop_resize_windows(mel, window, (4, 32))
    torch.testing.assert_close(out[0, 0, 0], torch.arange(16, 48, dtype=torch.float32))
    torch.testing.assert_close(out[1, 0, 0], mel[1, 0, ::2] + 0.5)
