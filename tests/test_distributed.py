"""Real processes: `accelerate launch --multi_gpu --num_processes 2` on CPU, ranks talking over gloo."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO
from fer_dist import predictions

TINY = "{embed_dim: 16, depths: [1, 1], num_heads: [1, 2], window_size: 4}"


def overrides(shards, run_dir):
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
        f"model.image_backbone_args={TINY}",
        f"model.audio_backbone_args={TINY}",
        "model.fusion_dim=32",
        "model.fusion_heads=2",
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd += [str(REPO / "fer_dist" / "train.py"), "--config", str(REPO / "configs" / "mfm_cpu.yaml"), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_train_and_evaluate_like_one(shards, tmp_path):
    run = tmp_path / "run"
    result = launch(2, *overrides(shards, run))
    assert "2 process(es) on cpu" in result.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 1 and set(metrics[0]["macro_f1_by_head"]) == {"image", "audio", "fusion", "ensemble"}
    trained = predictions.load(run / "predictions" / "epoch001.npz")
    assert len(trained) == metrics[0]["eval_frames"] == len(set(trained.key))

    weights = run / "checkpoints" / "last" / "model.safetensors"
    scored = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        launch(n, *overrides(shards, out), "--evaluate", str(weights))
        scored[n] = (
            predictions.load(out / "predictions" / "evaluate.npz"),
            json.loads((out / "evaluate.json").read_text()),
        )
    (one, m1), (two, m2) = scored[1], scored[2]
    assert one.key.tolist() == two.key.tolist() == trained.key.tolist()
    assert (one.label == two.label).all()
    for head in one.logits:
        assert (one.logits[head].argmax(1) == two.logits[head].argmax(1)).all()
        np.testing.assert_allclose(one.logits[head], two.logits[head], atol=1e-5)
    assert m1 == m2
    np.testing.assert_allclose(one.logits["ensemble"], trained.logits["ensemble"], atol=1e-5)
