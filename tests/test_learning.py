"""Learning, not plumbing: on a generated set whose class cue is a small shape at a free place,
size and colour on a texture (`fer-dist synth --style shapes`), a short image-only run with the CPU
config's defaults ends well above chance, which a dead branch (stuck at the class prior) or a
starved one cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fer_dist.data.format import PackParams, read_manifest
from fer_dist.data.layout import discover
from fer_dist.data.pack import pack
from fer_dist.data.synth import synthesize
from fer_dist.engine import predictions
from fer_dist.engine.metrics import chance_macro_f1
from fer_dist.labels import NUM_CLASSES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(root / "data", 8, seed=3, workers=2, length=400, style="shapes")
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
    assert last["train_loss"] < 0.8 * np.log(NUM_CLASSES)  # below the class prior's entropy: it learnt
    # a branch stuck at the prior names one class (macro-F1 about chance / 3), a starved one guesses
    # (about chance); this one scored 0.17 and 0.22 (two versions of the code) against 0.12: the
    # held-out figure of a short run on two videos moves with the float order of the steps
    assert last["macro_f1"] > 1.2 * chance, (last["macro_f1"], chance)
    drawn = last["stream"]["videos_per_batch"]
    assert drawn["min"] >= 2 and drawn["median"] >= 4  # batches draw on several videos from the first
    assert read_manifest(shapes / "shards").groups["fold0"].samples == last["eval_frames"]
