"""Real processes on CPU, ranks talking over gloo: the stream under torchrun with 2 and 3 ranks, and
the training loop under `accelerate launch --multi_gpu` evaluating identically on 1, 2 and 3 ranks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fer_dist.data.shards.format import read_manifest
from fer_dist.engine import predictions
from fer_dist.engine.evaluation import scores
from helpers import REPO, TRAIN_SCRIPT, free_port, launch, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch_train(processes, *args):
    return launch(processes, *TRAIN_SCRIPT, "--config", REPO / "configs" / "mfm_cpu.yaml", *args)


def test_two_ranks_train_and_evaluate_like_one(shards, tmp_path):
    run = tmp_path / "run"
    result = launch_train(2, *tiny_run(shards, run))
    assert "2 process(es) on cpu" in result.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 1 and set(metrics[0]["macro_f1_by_head"]) == {"image", "audio", "fusion", "ensemble"}
    stream = metrics[0]["stream"]  # summed over both ranks' loaders
    assert stream["emitted"] >= 64 and stream["read"] > 0 and stream["corrupt_shards"] == 0
    for drawn in (stream["videos_per_batch"], stream["clips_per_batch"]):  # batches of 8 frames
        assert 1 <= drawn["min"] <= drawn["median"] <= 8
    assert stream["videos_per_batch"]["median"] <= stream["clips_per_batch"]["median"]
    trained = predictions.load(run / "predictions" / "epoch001.npz")
    assert len(trained) == metrics[0]["eval_frames"] == len(set(trained.key))

    best = run / "checkpoints" / "best"
    scored = {}
    for n in (1, 2, 3):  # the prediction job alone, over the held-out group, on 1, 2 and 3 ranks
        out = tmp_path / f"eval{n}.npz"
        launch(n, "-m", "fer_dist.jobs.predict", best, "--shards", shards, "--group", "fold0", "--out", out)
        p = predictions.load(out)
        scored[n] = (p, scores(p))
    one, m1 = scored[1]
    assert one.key.tolist() == trained.key.tolist()
    for n in (2, 3):
        other, m = scored[n]
        assert other.key.tolist() == one.key.tolist() and (other.label == one.label).all()
        for head in one.logits:
            assert (one.logits[head].argmax(1) == other.logits[head].argmax(1)).all()
            np.testing.assert_allclose(one.logits[head], other.logits[head], atol=1e-5)
        assert m == m1
    np.testing.assert_allclose(one.logits["ensemble"], trained.logits["ensemble"], atol=1e-5)


def torchrun(world, shards, out, holdout, epochs=2, workers=2):
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    cmd += ["--master_port", str(free_port()), str(REPO / "tests" / "stream_ranks.py")]
    cmd += [str(shards), str(out), str(epochs), str(workers), str(holdout)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_stream_ranks_get_equal_batches_in_a_seeded_order(shards, tmp_path, world):
    groups = read_manifest(shards).groups
    total = sum(len(groups[f"fold{k}"].shards) for k in range(5))
    holdout = next(k for k in range(5) if (total - len(groups[f"fold{k}"].shards)) % world)  # uneven shards
    first = torchrun(world, shards, tmp_path / "a", holdout)
    for rank in first:
        for epoch in rank.values():
            assert epoch["batches"] == epoch["planned"] == 120 // (8 * world)
            assert len(epoch["keys"]) == 8 * epoch["batches"]
    assert first[0]["0"]["keys"] != first[0]["1"]["keys"]  # a new order every epoch
    assert first[0]["0"]["keys"] != first[1]["0"]["keys"]  # and on every rank
    if world == 3:
        assert torchrun(world, shards, tmp_path / "b", holdout) == first  # the same seed: the same samples, in order
