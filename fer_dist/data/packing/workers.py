"""Worker processes whose failure ends the job within seconds, never a hang.

`multiprocessing.Pool` waits forever for the task of a worker killed by a signal (the kernel's
out-of-memory killer, a user's `kill -9`), and its `terminate` can wait on a lock that a dead worker
held. `concurrent.futures.ProcessPoolExecutor` notices a dead worker and fails every pending task
(`BrokenProcessPool`); on any failure `pool` cancels what has not started and kills the workers
still running, so the error reaches the user at once.

Workers started by a forkserver are forked by that one process as they are needed: a forkserver
killed (by the same signals) before it has started them all leaves the pool unable to start one,
which the pool's caller would otherwise meet as an `EOFError` (the forkserver's connection ends) or
an `OSError`. Either failure is a `ChildProcessError` naming the worker lost: an `OSError`, which
every command prints as one line.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

DIED = (
    "a worker process ended abruptly or was lost (killed by a signal, or out of memory; or the forkserver process "
    "that starts the workers was)"
)
LOST = (
    "a worker process was lost before it started (the forkserver process that starts the workers ended abruptly: "
    "killed by a signal, or out of memory)"
)
SETTLE_S = 5  # s: the most a failing pool waits for a killed worker, then for its managing thread, to end


@contextlib.contextmanager
def pool(
    workers: int, context: multiprocessing.context.BaseContext, initializer: Callable | None = None, initargs=()
) -> Iterator[ProcessPoolExecutor]:
    """`workers` processes started by `context`; on leaving with an exception, the tasks not begun
    are cancelled, the workers still running killed and the pool's managing thread given up to
    `SETTLE_S` to end before the exception goes on (ended, it cannot race the interpreter's exit:
    a pipe it closes as the exit writes to it is an "OSError: handle is closed" printed after the
    error)."""
    executor = ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=initializer, initargs=initargs)
    try:
        yield executor
    except BaseException:
        manager = getattr(executor, "_executor_manager_thread", None)  # None once shut down, or never started
        executor.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.kill()
            child.join(SETTLE_S)
        if manager is not None:
            manager.join(SETTLE_S)
        raise
    executor.shutdown()


def submitted(executor: ProcessPoolExecutor, fn: Callable, jobs: Iterable) -> list[Future]:
    """`fn(job)` of each of `jobs`, handed to `executor`'s workers, which it starts as they are
    needed. Raises ChildProcessError when one cannot be started (`LOST`: the forkserver that forks
    them is gone, its connection ends with an EOFError or an OSError) or a worker died (`DIED`)."""
    try:
        return [executor.submit(fn, job) for job in jobs]
    except BrokenProcessPool:
        raise ChildProcessError(DIED) from None
    except (EOFError, OSError):
        raise ChildProcessError(LOST) from None


def completed(executor: ProcessPoolExecutor, fn: Callable, jobs: Iterable) -> Iterator:
    """`fn(job)` of each of `jobs`, in the order they finish. Raises what `fn` raised, and
    ChildProcessError (an OSError: one line on the command line) when a worker died or could not be
    started (`submitted`)."""
    futures = submitted(executor, fn, jobs)
    try:
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool:
        raise ChildProcessError(DIED) from None


def in_order(executor: ProcessPoolExecutor, fn: Callable, jobs: Iterable) -> list:
    """`fn(job)` of each of `jobs`, in their order; raises as `completed` does."""
    futures = submitted(executor, fn, jobs)
    try:
        return [future.result() for future in futures]
    except BrokenProcessPool:
        raise ChildProcessError(DIED) from None
