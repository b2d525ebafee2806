"""`sbatch slurm/cv5.sh` on a real SLURM cluster of two slurmd "nodes" on this machine
(slurm/cluster.sh): the fold array with two nodes per fold, a task requeued by its time-limit
signal that resumes from its checkpoint, and the dependent ensemble job's report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fer_dist.data.packing.synth import TEST_LABELS
from helpers import REPO, tiny_config

needs_slurm = pytest.mark.skipif(
    shutil.which("slurmctld") is None or os.geteuid() != 0,
    reason="needs root and slurm-wlm + munge (sudo slurm/cluster.sh install; .ci/run installs them)",
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture
def cluster(tmp_path):
    state = tmp_path / "slurm"
    started = subprocess.run(
        [str(REPO / "slurm" / "cluster.sh"), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr + started.stdout
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["scancel", "--user", "root"], env={**os.environ, "SLURM_CONF": str(state / "slurm.conf")})
    subprocess.run([str(REPO / "slurm" / "cluster.sh"), "stop", str(state)], timeout=60)


def slurm(env: dict, *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def wait_for(condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@needs_slurm
def test_cv5_array_two_nodes_requeue_and_ensemble(cluster, challenge, tmp_path):
    cv = tmp_path / "cv"
    # fold 0 trains long enough (40 steps) for the signal to arrive mid-epoch
    longer = ("data.epoch_samples=640", "train.checkpoint_every=2")
    config = tiny_config(tmp_path / "tiny.yaml", challenge / "shards", *longer)
    env = {
        **cluster,
        "CONFIG": str(config),
        "CV_DIR": str(cv),
        "NODES": "2",
        "TRUTH": str(challenge / "data" / TEST_LABELS),
        "OMP_NUM_THREADS": "1",
    }
    slurm(env, "sbatch", "--chdir", str(REPO), "--output", str(tmp_path / "submit.log"), str(REPO / "slurm" / "cv5.sh"))
    wait_for(lambda: (cv / "jobs.json").exists(), "the submitting job")
    jobs = json.loads((cv / "jobs.json").read_text())
    assert jobs["folds"] == 3
    task0 = f"{jobs['array']}_0"

    # the time-limit warning (USR1 to the job's steps) while fold 0 trains: checkpoint, requeue
    wait_for(lambda: any((cv / "fold0" / "checkpoints").glob("step-*")), "fold 0's first checkpoint")
    # scancel retries while the requeue it causes is under way: let it, and stop it afterwards
    signaller = subprocess.Popen(["scancel", "--signal=USR1", task0], env=env)
    wait_for(lambda: "requeueing" in (cv / "logs" / "fold0.log").read_text(), "the requeue")
    signaller.kill()
    # SLURM holds a requeued job back for two minutes; let it start now
    wait_for(lambda: "BeginTime" in slurm(env, "squeue", "-h", "-j", task0, "-o", "%r"), "the requeued task")
    slurm(env, "scontrol", "update", f"JobId={task0}", "StartTime=now")

    report = cv / "ensemble" / "report.json"
    wait_for(lambda: report.exists() and not slurm(env, "squeue", "-h", "-j", jobs["ensemble"]).strip(), "the ensemble")

    log0 = (cv / "logs" / "fold0.log").read_text()
    assert "restart 0" in log0 and "restart 1" in log0 and "training ended with status 0" in log0
    node0 = (cv / "logs" / "fold0-node0.log").read_text()
    assert "resumed from" in node0 and "batch 0 of" not in node0  # resumed mid-epoch, not restarted
    for k in range(3):
        assert "2 node(s)" in (cv / "logs" / f"fold{k}.log").read_text()
        assert "2 process(es)" in (cv / "logs" / f"fold{k}-node0.log").read_text()  # one rank per node
        assert (cv / "logs" / f"fold{k}-node1.log").exists()
        epochs = [json.loads(line)["epoch"] for line in (cv / f"fold{k}" / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1]
    result = json.loads(report.read_text())
    assert [r["name"] for r in result["validation"][:3]] == ["cv-fold0", "cv-fold1", "cv-fold2"]
    assert any(r["name"] == "ensemble (vote)" for r in result["test"])
    assert "fold 0: finished, kept" in (cv / "logs" / "ensemble.log").read_text()
    assert Path(cv / "ensemble" / "submission" / "abaw5.csv").exists()
