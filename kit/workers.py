"""Process pools that do not hang on these machines.

A fork-based pool created after torch or OpenCV started their thread pools can deadlock, so every
pool in the kit is a ``spawn`` pool whose workers run one thread each (the pool is the parallelism).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def init_worker() -> None:
    """One thread per worker process: OpenCV always, torch when it is loaded."""
    import cv2

    cv2.setNumThreads(0)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def can_spawn() -> bool:
    """False when the main module cannot be re-imported (``python - < script``): spawn would loop."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def pool_map(fn: Callable[[T], R], jobs: Iterable[T], workers: int = 1, *, ordered: bool = True,
             chunksize: int = 1, window: int | None = None) -> Iterator[R]:
    """Yield ``fn(job)`` for each job: in this process when ``workers <= 1`` (or one job), else in a
    spawn pool of at most `workers` processes (results in job order when `ordered`).

    `window` bounds the jobs in flight (results in job order): for large results that the caller
    consumes slower than the pool makes them (decoded images), so memory stays bounded.
    `fn` must be a module-level function (spawn pickles it by name).
    """
    jobs = list(jobs)
    workers = min(int(workers or 1), len(jobs))
    if workers <= 1 or not can_spawn():
        yield from map(fn, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
        if window is None:
            imap = pool.imap if ordered else pool.imap_unordered
            yield from imap(fn, jobs, chunksize=chunksize)
            return
        todo = iter(jobs)
        pending = deque(pool.apply_async(fn, (job,)) for _, job in zip(range(max(1, window)), todo))
        while pending:
            result = pending.popleft().get()
            for job in todo:
                pending.append(pool.apply_async(fn, (job,)))
                break
            yield result
