"""Worker processes whose failure ends the job within seconds, never a hang.

`multiprocessing.Pool` waits forever for the task of a worker killed by a signal (the kernel's
out-of-memory killer, a user's `kill -9`), and its `terminate` can wait on a lock that a dead worker
held. `concurrent.futures.ProcessPoolExecutor` notices a dead worker and fails every pending task
(`BrokenProcessPool`); on any failure `pool` cancels what has not started and kills the workers
still running, so the error reaches the user at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

DIED = "a worker process ended abruptly (killed by a signal, or out of memory)"


@contextlib.contextmanager
def pool(
    workers: int, context: multiprocessing.context.BaseContext, initializer: Callable | None = None, initargs=()
) -> Iterator[ProcessPoolExecutor]:
    """`workers` processes started by `context`; on leaving with an exception, the tasks not begun
    are cancelled and the workers still running killed before the exception goes on."""
    executor = ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=initializer, initargs=initargs)
    try:
        yield executor
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.kill()
            child.join(5)
        raise
    executor.shutdown()


def completed(executor: ProcessPoolExecutor, fn: Callable, jobs: Iterable) -> Iterator:
    """`fn(job)` of each of `jobs`, in the order they finish. Raises what `fn` raised, and
    ChildProcessError (an OSError: one line on the command line) when a worker died."""
    try:
        for future in as_completed([executor.submit(fn, job) for job in jobs]):
            yield future.result()
    except BrokenProcessPool:
        raise ChildProcessError(DIED) from None


def in_order(executor: ProcessPoolExecutor, fn: Callable, jobs: Iterable) -> list:
    """`fn(job)` of each of `jobs`, in their order; raises as `completed` does."""
    try:
        return list(executor.map(fn, jobs))
    except BrokenProcessPool:
        raise ChildProcessError(DIED) from None
