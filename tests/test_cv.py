"""`fer-dist cv`, `ensemble` and `predict` from the command line, on a small synthetic challenge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fer_dist.data.packing.layout import discover
from fer_dist.data.packing.pack import pack
from fer_dist.data.packing.synth import TEST_LABELS, TEST_LIST, TEST_TEMPLATE
from fer_dist.data.shards.format import PackParams, read_manifest
from fer_dist.engine import predictions as preds_lib
from helpers import REPO, tiny_config


def fer_dist(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fer_dist.cli", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_cv_resumes_fold_by_fold_then_predicts_and_submits(challenge, tmp_path):
    data, shards, cv = challenge / "data", challenge / "shards", tmp_path / "cv"
    config = tiny_config(tmp_path / "tiny.yaml", shards)
    args = ["cv", "--config", str(config), "--cv-dir", str(cv)]
    args += ["--truth", str(data / TEST_LABELS), "--template", str(data / TEST_TEMPLATE)]

    # killed (with its fold's processes) while fold 1 trains
    first = fer_dist(*args, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (cv / "fold1" / "config.yaml").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    fold0 = cv / "fold0" / "checkpoints" / "best" / "model.safetensors"
    trained = fold0.stat().st_mtime_ns

    second = fer_dist(*args)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert "fold 0: finished, kept" in out
    assert "fold 1: finished" not in out
    assert fold0.stat().st_mtime_ns == trained  # not retrained
    for k in range(3):
        epochs = [json.loads(line)["epoch"] for line in (cv / f"fold{k}" / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1]

    report = json.loads((cv / "ensemble" / "report.json").read_text())
    assert [r["name"] for r in report["validation"][:3]] == ["cv-fold0", "cv-fold1", "cv-fold2"]
    assert {r["name"] for r in report["test"]} >= {"mean of members", "ensemble (vote)"}
    manifest = read_manifest(shards)
    test_videos = {v: r.frames for v, r in manifest.videos.items() if r.split == "test"}
    # every frame of every test video, exactly once, in both formats
    template_rows = (data / TEST_TEMPLATE).read_text().splitlines()[1:]
    rows = (cv / "ensemble" / "submission" / "abaw5.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [r.split(",")[0] for r in template_rows]
    for video, n in test_videos.items():
        lines = (cv / "ensemble" / "submission" / "abaw3" / f"{video}.txt").read_text().splitlines()
        assert len(lines) == n + 1 and all(0 <= int(x) < 8 for x in lines[1:])
    test = preds_lib.load(cv / "ensemble" / "test.npz")
    assert len(test) == sum(test_videos.values()) == manifest.groups["test"].samples

    # a rerun retrains nothing and predicts nothing again
    third = fer_dist(*args)
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and out.count("finished, kept") == 3 and "predicting" not in out

    # another ensemble of the same folds, by averaging
    truth = ["--truth", str(data / TEST_LABELS)]
    mean = fer_dist("ensemble", str(cv), "--how", "mean", "--out", str(cv / "ensemble"), *truth)
    out, _ = mean.communicate(timeout=120)
    assert mean.returncode == 0, out
    assert "ensemble (mean)" in (cv / "ensemble" / "report.md").read_text()

    # a template asking for a frame the shards do not hold: refused, the files are left as they were
    template = tmp_path / "template.csv"
    template.write_text((data / TEST_TEMPLATE).read_text() + "no-such-video/00001.jpg,\n")
    written = (cv / "ensemble" / "submission" / "abaw5.csv").read_bytes()
    target = ["--out", str(cv / "ensemble"), "--template", str(template)]
    refused = fer_dist("predict", str(cv), "--shards", str(shards), *target)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2
    assert "refusing to predict" in out and "no-such-video/00001" in out  # before any prediction
    assert (cv / "ensemble" / "submission" / "abaw5.csv").read_bytes() == written

    # other shards of the same test videos: every member predicts them anew (none of the earlier
    # predictions is taken for theirs), then, asked again, keeps what it made
    other = tmp_path / "other_shards"
    pack(discover(data, test_list=data / TEST_LIST), other, PackParams(samples_per_shard=200, n_folds=3), workers=2)
    for predicted in (3, 0):
        again = fer_dist("predict", str(cv), "--shards", str(other), "--out", str(cv / "ensemble"))
        out, _ = again.communicate(timeout=300)
        assert again.returncode == 0 and out.count("predicting test of") == predicted, out[-3000:]

    # an ensemble's output into a training run's folder is refused, the run left as it was
    fold0_files = {p: p.read_bytes() for p in (cv / "fold0").rglob("*") if p.is_file()}
    into_run = fer_dist("predict", str(cv), "--shards", str(shards), "--out", str(cv / "fold0"))
    out, _ = into_run.communicate(timeout=300)
    assert into_run.returncode == 2 and "holds a training run" in out, out[-3000:]
    assert {p: p.read_bytes() for p in (cv / "fold0").rglob("*") if p.is_file()} == fold0_files


def test_a_single_process_fold_gets_every_core(tmp_path):
    """`accelerate launch` alone would start the lone training process with one thread."""
    from fer_dist.jobs.launch import launcher

    script = tmp_path / "threads.py"
    script.write_text("import torch\nprint('threads', torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([*launcher(None), str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"threads {len(os.sched_getaffinity(0))}" in done.stdout
