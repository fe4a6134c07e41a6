"""Worker processes for per-image CPU work (dataset scan, dCRF, SVM expansion).

Spawned, not forked: the worker process holds torch threads, which fork does not copy safely.
Each child watches its parent and exits when it is gone, so a SIGKILLed worker leaves no orphan
processes burning CPU on images nobody will record.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from engine.types import LabelResult


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def process_pool(processes: int) -> ProcessPoolExecutor:
    """A pool of ``processes`` spawned workers that end when this process dies."""
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


class LazyPool:
    """Per-image jobs over one or more ``map`` calls: in this process when ``processes <= 1``,
    else on ``processes`` spawned workers started at the first job (so a run that finds all its
    work stored starts none) and shut down on ``close`` / leaving the ``with`` block."""

    def __init__(self, processes: int):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[..., LabelResult], jobs: Iterable[Any], *args: Any) -> Iterator[LabelResult]:
        """``fn(job, *args)`` per job, in order (``map_in_order``, window ``2 * processes``);
        ``LabelResult`` jobs pass through."""
        if self.processes <= 1:
            for job in jobs:
                yield job if isinstance(job, LabelResult) else fn(job, *args)
            return
        if self._pool is None:
            self._pool = process_pool(self.processes)
        yield from map_in_order(self._pool, fn, jobs, 2 * self.processes, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LazyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_jobs(fn: Callable[..., LabelResult], jobs: Iterable[Any], processes: int, *args: Any) -> Iterator[LabelResult]:
    """``LazyPool(processes).map(fn, jobs, *args)``, the pool shut down when the generator ends or is closed."""
    with LazyPool(processes) as pool:
        yield from pool.map(fn, jobs, *args)


def map_in_order(
    pool: Executor, fn: Callable[..., LabelResult], jobs: Iterable[Any], window: int, *args: Any
) -> Iterator[LabelResult]:
    """``fn(job, *args)`` for each job on ``pool``, yielded in input order.

    At most ``window`` jobs are submitted ahead of the one being waited for, so closing the
    generator (cancel) leaves at most ``window`` images to finish or drop. A job that is already
    a ``LabelResult`` (an error found by the parent) passes through in its place.
    """
    pending: deque[Future | LabelResult] = deque()
    jobs = iter(jobs)
    try:
        while True:
            for job in jobs:
                pending.append(job if isinstance(job, LabelResult) else pool.submit(fn, job, *args))
                if len(pending) >= window:
                    break
            if not pending:
                return
            head = pending.popleft()
            yield head if isinstance(head, LabelResult) else head.result()
    finally:
        for entry in pending:
            if isinstance(entry, Future):
                entry.cancel()
