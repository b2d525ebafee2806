"""A packing whose worker fails never hangs: a worker killed by SIGKILL (as the out-of-memory killer
does), the forkserver that starts the workers killed, or a spool write that finds the disk full ends
`fer-dist shard` within a bounded wait, with one line and status 2, the scratch folder kept for the
resume and said so (`fer-dist crop` the same, its forkserver killed). Real processes: the command
runs as a subprocess; the fault is a real signal, or an `OSError(ENOSPC)` raised inside the workers
by a `sitecustomize` the test puts on their path. A bad input is refused before anything is packed;
a rerun after inputs were mended resumes or starts over, never refuses its own scratch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fer_dist.data.packing.layout import discover, read_annotation
from fer_dist.data.shards.format import read_manifest
from helpers import mirror

BOUND_S = 90  # a packing that has not ended this long after its fault has hung

FULL_DISK = """
import errno, os
if os.environ.get("FULL_DISK_AFTER"):
    import fer_dist.data.packing.pack as pack
    real, videos = pack.tar_record, set()
    def tar_record(key, members):  # a write of a spool, which says only "No space left on device"
        videos.add(key.rsplit("/", 1)[0])
        if len(videos) > int(os.environ["FULL_DISK_AFTER"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(key, members)
    pack.tar_record = tar_record
if os.environ.get("FULL_DISK_SHARDS"):
    import contextlib
    import fer_dist.data.packing.pack as pack
    class Full:  # a shard file that finds the disk full after its first bytes
        def __init__(self, fh):
            self.fh = fh
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.fh.close()
        def write(self, data):
            self.fh.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def full_open(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        return Full(fh) if mode == "wb" and str(path).endswith(".tar.tmp") and ".work" not in str(path) else fh
    pack.open = full_open
    pack.writing = lambda path: contextlib.nullcontext()  # as a worker killed mid-write: its file stays
if os.environ.get("FULL_DISK_CROPS"):
    from PIL import Image
    real_save, saved = Image.Image.save, []
    def save(self, fp, *args, **kwargs):  # a crop's JPEG written, after so many, finds the disk full
        if str(fp).endswith(".jpg"):
            saved.append(fp)
            if len(saved) > int(os.environ["FULL_DISK_CROPS"]):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)
    Image.Image.save = save
"""


def shard(synthetic, out, env=None, command="shard") -> subprocess.Popen:
    """`fer-dist shard` of the set `synthetic` into `out`, or `fer-dist crop` of its videos."""
    argv = [sys.executable, "-m", "fer_dist.cli", command, "--out", str(out), "--workers", "2"]
    if command == "shard":
        argv += ["--root", str(synthetic)]
    else:
        argv += ["--videos", *(str(synthetic / folder) for folder in ("batch1", "batch2", "new_vids"))]
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


def forkserver_of(pid: int) -> psutil.Process | None:
    """The forkserver of the command `pid`: its child that forks the workers (they show its command
    line in `ps`, but are its children, the command's grandchildren)."""
    try:
        return next((p for p in psutil.Process(pid).children() if "forkserver" in " ".join(p.cmdline())), None)
    except psutil.Error:
        return None


def one_line(err: str, says: str, out, kept: bool = True) -> str:
    """The error is one line after the progress bar and (`kept`) the warning that the work is kept;
    returns it."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err and "Exception ignored" not in err, err
    if kept:
        assert "the same command resumes" in " ".join(err.split()) and (out / ".work").is_dir()
        assert not (out / "manifest.json").exists()
    return lines[0]


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
    one_line(err, "a worker process ended abruptly or was lost (killed by a signal, or out of memory", out)


def full_disk(tmp_path: Path) -> dict:
    """An environment whose packing workers find the disk full at their second spool write."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    return {**os.environ, "FULL_DISK_AFTER": "1", "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}


def test_a_full_disk_in_a_worker_ends_the_packing_with_one_line(synthetic, tmp_path):
    """Each worker's second spool write finds the disk full; with room again, the same command
    resumes from the videos packed before the failure (at most one a worker), and says so."""
    env = full_disk(tmp_path)
    out = tmp_path / "shards"
    status, err = ended(shard(synthetic, out, env))
    assert status == 2
    said = one_line(err, "No space left on device", out)
    assert f"{out / '.work'}/" in said and ".tar.tmp" in said  # the file being written
    status, err = ended(shard(synthetic, out))  # room again: the same command resumes, and says so
    resumed = re.search(r"resuming: (\d) of 7 videos were packed before", " ".join(err.split()))
    assert status == 0 and resumed and 1 <= int(resumed[1]) <= 2, err  # one a worker, before its failure
    assert (out / "manifest.json").exists() and not (out / ".work").exists()


@pytest.mark.parametrize("when", ["before-its-workers", "mid-pack"])
def test_the_forkserver_killed_ends_the_packing_with_one_line_and_keeps_the_work(synthetic, tmp_path, when):
    """The forkserver killed as soon as it is there (before it forked the workers: the pool cannot
    start one) or after a video was packed (the workers lost with it): one line naming the worker
    lost, status 2, the scratch kept; after the mid-pack kill the same command resumes."""
    out = tmp_path / "shards"
    proc = shard(synthetic, out)
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline and proc.poll() is None:
        server = forkserver_of(proc.pid)
        ready = when == "before-its-workers" or len(list((out / ".work").glob("*.json"))) >= 2
        if server is not None and ready:
            server.kill()
            break
        time.sleep(0.01)
    status, err = ended(proc)
    assert status == 2
    said = one_line(err, "a worker process", out)
    assert "lost" in said and "forkserver" in said, said
    if when == "mid-pack":
        status, err = ended(shard(synthetic, out))
        assert status == 0 and "resuming:" in err and (out / "manifest.json").exists(), err


def test_crops_forkserver_killed_before_its_workers_ends_the_cropping_with_one_line(synthetic, tmp_path):
    """`fer-dist crop` uses the same pool: its forkserver killed at once is one line, status 2."""
    proc = shard(synthetic, tmp_path / "root", command="crop")
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline and proc.poll() is None:
        server = forkserver_of(proc.pid)
        if server is not None:
            server.kill()
            break
        time.sleep(0.005)
    status, err = ended(proc)
    assert status == 2 and "lost" in one_line(err, "a worker process", tmp_path, kept=False)


def test_a_full_disk_while_the_shards_are_written_leaves_no_part_of_one_and_says_what_room_is_needed(
    synthetic, tmp_path
):
    """The shards, written after every video was packed, find the disk full, and their workers'
    unfinished files are left as a worker killed mid-write leaves them: the packing removes them
    (they filled the disk until a later run), says that it needs room for the packed videos and the
    shards together, and with room again resumes with every video packed."""
    env = {**full_disk(tmp_path), "FULL_DISK_AFTER": "", "FULL_DISK_SHARDS": "1"}
    out = tmp_path / "shards"
    status, err = ended(shard(synthetic, out, env))
    assert status == 2 and one_line(err, "No space left on device", out)
    assert not list(out.glob("*.tmp")) and not list((out / ".work").glob("*.tmp"))
    assert "about twice the shards' size" in " ".join(err.split())
    status, err = ended(shard(synthetic, out))
    assert status == 0 and "resuming: 7 of 7 videos were packed before" in " ".join(err.split()), err


def test_a_full_disk_ends_the_cropping_with_one_line_not_as_unreadable_videos(synthetic, tmp_path):
    """`fer-dist crop` whose crops find the disk full (each worker's 20th JPEG): one line naming the
    crop being written, status 2; the videos are not reported unreadable and skipped (they were, and
    the cropping went on and ended with status 0 when one video had been cropped)."""
    env = {**full_disk(tmp_path), "FULL_DISK_AFTER": "", "FULL_DISK_CROPS": "20"}
    status, err = ended(shard(synthetic, tmp_path / "root", env, command="crop"))
    said = one_line(err, "No space left on device", tmp_path, kept=False)
    assert status == 2 and said.rstrip("'").endswith(".jpg") and "unreadable" not in err, err


def test_an_unreadable_annotation_is_refused_before_any_video_is_packed(synthetic, tmp_path):
    """The last video's annotation saved as UTF-16 without a byte-order mark: refused in one line
    before anything is written (it was refused after the other videos were packed, and the rerun
    after it was mended refused the scratch); mended, the same command packs."""
    root = mirror(synthetic, tmp_path / "root")
    victim = max(discover(root), key=lambda v: v.name).annotation
    good = victim.read_text()
    victim.write_bytes(good.encode("utf-16-le"))
    out = tmp_path / "shards"
    status, err = ended(shard(root, out))
    assert status == 2 and f"{victim}:" in one_line(err, "UTF-16 or UTF-32 saved without one?", out, kept=False)
    assert not out.exists()
    victim.write_text(good)
    status, err = ended(shard(root, out))
    assert status == 0 and (out / "manifest.json").exists() and "starting over" not in err, err


def test_a_packing_stopped_then_given_mended_inputs_starts_over_and_says_so(synthetic, tmp_path):
    """Stopped by a full disk with videos packed; then an annotation changes (a label mended): the
    rerun removes the scratch of the old inputs and packs the new ones, not refusing it."""
    root = mirror(synthetic, tmp_path / "root")
    env = full_disk(tmp_path)
    out = tmp_path / "shards"
    status, err = ended(shard(root, out, env))
    assert status == 2 and list((out / ".work").glob("*.json"))
    video = min(discover(root), key=lambda v: v.name)
    lines = video.annotation.read_text().splitlines()
    changed = next(i for i, line in enumerate(lines[1:], 1) if line.strip() not in ("-1", "0"))
    lines[changed] = "0"
    video.annotation.write_text("\n".join(lines) + "\n")
    status, err = ended(shard(root, out))
    assert status == 0 and "held the unfinished shards of other inputs or settings" in " ".join(err.split()), err
    manifest = read_manifest(out)
    labels = read_annotation(video.annotation)
    assert manifest.videos[video.name].labelled_class_counts == np.bincount(labels[labels >= 0], minlength=8).tolist()
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s.name for g in manifest.groups.values() for s in g.shards
    )


def test_a_write_that_fails_removes_what_it_wrote_and_names_the_file(tmp_path):
    """A full disk mid-write: the partial file goes (the disk is not left fuller for the rerun), and
    the error, which the system gives without a name, names it."""
    import errno

    from fer_dist.data.shards.format import writing

    path = tmp_path / "video.tar.tmp"
    with pytest.raises(OSError) as raised, writing(path), open(path, "wb") as fh:
        fh.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path) and not path.exists()
