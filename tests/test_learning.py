"""Learning, not plumbing: on a generated set whose class cue is a shape at a free place, size and
colour on a texture (`fer-dist synth --style shapes`, here with larger shapes than the benchmark's),
a short image-only run with the CPU config's defaults ends well above chance, which a dead branch
(stuck at the class prior) or a starved one cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fer_dist.data.packing.layout import discover
from fer_dist.data.packing.pack import pack
from fer_dist.data.packing.synth import synthesize
from fer_dist.data.shards.format import PackParams, read_manifest
from fer_dist.engine import predictions
from fer_dist.engine.metrics import chance_macro_f1
from fer_dist.labels import NUM_CLASSES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    # 24 short videos: about 200 label segments, each a new draw of its shape, so that 18 videos
    # train and 6 score; on 8 videos of 400 frames (6 training, 2 scored) the held-out figure of
    # three seeds ran from 0.06 to 0.17 against a chance of 0.12
    synthesize(root / "data", 24, seed=3, workers=2, length=300, style="shapes", shape_size=(34, 50))
    pack(discover(root / "data"), root / "shards", PackParams(samples_per_shard=300, n_folds=4), workers=2)
    return root


def test_the_image_branch_learns_a_small_shape_at_a_free_place(shapes, tmp_path):
    from fer_dist.cli import main

    run = tmp_path / "run"
    args = ["--config", "mfm_cpu", f"data.shards={shapes / 'shards'}", f"train.run_dir={run}", "train.log_with=[]"]
    assert main(["train", *args, "model.stage=image", "data.epoch_samples=19200", "train.epochs=1"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    held_out = predictions.load(run / "predictions" / "epoch001.npz").label
    chance = chance_macro_f1(np.bincount(held_out, minlength=NUM_CLASSES))
    assert last["train_loss"] < 0.8 * np.log(NUM_CLASSES)  # well below ln 8, a uniform guess's loss: it learnt
    # a branch stuck at the prior names one class (macro-F1 about chance / 3), a starved one guesses
    # (about chance); this one scored 0.19-0.28 over train.seed 0, 1, 2 and two orders of summing the
    # clip's norm (1.7-2.5 times chance, 0.11): the bound leaves room for a float order that moves
    # seed 0's 0.19 as far as another seed would
    assert last["macro_f1"] > 1.3 * chance, (last["macro_f1"], chance)
    drawn = last["stream"]["videos_per_batch"]
    assert drawn["min"] >= 2 and drawn["median"] >= 4  # batches draw on several videos from the first
    assert read_manifest(shapes / "shards").groups["fold0"].samples == last["eval_frames"]
