"""Starting a job's processes: `accelerate launch -m MODULE` over whatever a machine has, and what
their exit status means to the job that started them."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from fer_dist.engine.checkpoint import REQUEUE_EXIT
from fer_dist.engine.rundir import RunDir


class Interrupted(Exception):
    """A run stopped on a signal; its checkpoint is on disk and rerunning the command resumes it."""


class RunFailed(Exception):
    """A run or a prediction failed; its own output above says why."""


def launcher(launch: str | None) -> list[str]:
    """`accelerate launch` with a config file, or over every GPU there is, or one process."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch:
        return command + ["--config_file", launch]
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return command + ["--multi_gpu", "--num_processes", str(gpus)]
    single = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # Accelerate starts a lone process with OMP_NUM_THREADS=1 unless told otherwise: on a CPU that
    # halves training speed on two cores; give it every core this process may use.
    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    return command + single + ["--num_cpu_threads_per_process", threads]


def run_module(
    module: str, args: list[str], launch: str | None, what: str, run: RunDir | None = None, here=None
) -> None:
    """`python -m module args` through `accelerate launch`; when that would be one process anyway,
    `here` (the module's main function) runs it in this process instead, without a second start
    of Python and torch. Raises Interrupted when a signal stopped it (its status, or `run`'s
    requeue file), RunFailed when it failed."""
    if here is not None and launch is None and torch.cuda.device_count() <= 1:
        status = here(args)
    else:
        status = subprocess.run([*launcher(launch), "-m", module, *args]).returncode
    if status == REQUEUE_EXIT or (run is not None and run.requeue.exists()):
        raise Interrupted(f"{what} was stopped by a signal; run the same command again to resume it")
    if status:
        raise RunFailed(f"{what} failed with status {status} (see its output above{f'; {run.path}' if run else ''})")
