"""A packing whose worker fails never hangs: a worker killed by SIGKILL (as the out-of-memory killer
does) or a spool write that finds the disk full ends `fer-dist shard` within a bounded wait, with
one line and status 2, the scratch folder kept for the resume and said so. Real processes: the
command runs as a subprocess; the fault is a real signal, or an `OSError(ENOSPC)` raised inside
the workers by a `sitecustomize` the test puts on their path."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

BOUND_S = 90  # a packing that has not ended this long after its fault has hung

FULL_DISK = """
import errno, os
if os.environ.get("FULL_DISK_AFTER"):
    import fer_dist.data.packing.pack as pack
    real, calls = pack.write_spool, []
    def write_spool(work, name, samples):
        calls.append(name)
        if len(calls) > int(os.environ["FULL_DISK_AFTER"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(work / (name + ".tar")))
        return real(work, name, samples)
    pack.write_spool = write_spool
"""


def shard(synthetic, out, env=None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fer_dist.cli", "shard", "--root", str(synthetic), "--out", str(out)]
    argv += ["--workers", "2"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def ended(proc: subprocess.Popen) -> tuple[int, str]:
    """The status and standard error of `proc`, which must end within BOUND_S."""
    try:
        _, err = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()
        pytest.fail(f"the packing hung: still running {BOUND_S} s after its fault")
    return proc.returncode, err


def workers_of(pid: int) -> list[psutil.Process]:
    """The packing's worker processes: the children of its forkserver."""
    try:
        servers = [p for p in psutil.Process(pid).children() if "forkserver" in " ".join(p.cmdline())]
        return [w for s in servers for w in s.children()]
    except psutil.Error:
        return []


def one_line(err: str, says: str, out) -> None:
    """The error is one line after the progress bar and the warning that the work is kept."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert "the same command resumes" in " ".join(err.split()) and (out / ".work").is_dir()
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("spools_first", [1, 3])
def test_a_worker_killed_by_sigkill_ends_the_packing_at_once(synthetic, tmp_path, spools_first):
    """Killed while it packs a video, after one and after three are done: a `multiprocessing.Pool`
    waited forever for the dead worker's video (this test, run on the code before, hung)."""
    out = tmp_path / "shards"
    proc = shard(synthetic, out)
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline and proc.poll() is None:
        workers = workers_of(proc.pid)
        if workers and len(list((out / ".work").glob("*.json"))) >= spools_first:
            os.kill(workers[0].pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    status, err = ended(proc)
    assert status == 2
    one_line(err, "a worker process ended abruptly (killed by a signal, or out of memory)", out)


def test_a_full_disk_in_a_worker_ends_the_packing_with_one_line(synthetic, tmp_path):
    """Each worker's second spool write finds the disk full; with room again, the same command
    resumes from the videos packed before the failure (at most one a worker), and says so."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    env = {**os.environ, "FULL_DISK_AFTER": "1", "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = tmp_path / "shards"
    status, err = ended(shard(synthetic, out, env))
    assert status == 2
    one_line(err, "No space left on device", out)
    status, err = ended(shard(synthetic, out))  # room again: the same command resumes, and says so
    resumed = re.search(r"resuming: (\d) of 7 videos were packed before", " ".join(err.split()))
    assert status == 0 and resumed and 1 <= int(resumed[1]) <= 2, err  # one a worker, before its failure
    assert (out / "manifest.json").exists() and not (out / ".work").exists()
