"""Per-image CPU work of a plugin on worker processes (dCRF, SVM expansion, random walks, merges).

Jobs stream through ``engine.core.processes.process_pool`` workers a few at a time, in order, so a
cancelled or killed job leaves at most a window of images in flight. With ``RunContext.ray_address``
set they run as Ray tasks instead (``engine.ops.ray_pool``); plugins ask ``open_pool`` /
``run_jobs`` and never import Ray.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from engine.core.processes import process_pool
from engine.core.types import Item, LabelResult, RunContext

if TYPE_CHECKING:
    from engine.ops.ray_pool import RayPool


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


def open_pool(ctx: RunContext) -> LazyPool | RayPool:
    """The pool for ``ctx``'s per-image work: Ray tasks on the cluster ``ctx.ray_address`` (results
    in order of completion), else ``LazyPool(ctx.processes)`` (in input order). Either is a
    context manager with ``map(fn, jobs, *args)``; ``fn`` must be a module-level function."""
    if ctx.ray_address is None:
        return LazyPool(ctx.processes)
    from engine.ops.ray_pool import RayPool  # imported only when used: a local run needs no Ray

    return RayPool(ctx.ray_address)


def run_jobs(fn: Callable[..., LabelResult], jobs: Iterable[Any], ctx: RunContext, *args: Any) -> Iterator[LabelResult]:
    """``open_pool(ctx).map(fn, jobs, *args)``, the pool closed when the generator ends or is
    closed. Results come in input order only on a local pool: consumers key them by image id.

    With ``ctx.finish`` set, each job's result is finished (files written, rows counted) in the
    process that made it; a job is matched to its ``ctx.todo`` item by its ``image_id``."""
    with open_pool(ctx) as pool:
        if ctx.finish is None:
            yield from pool.map(fn, jobs, *args)
            return
        items = {item.image_id: item for item in ctx.todo}
        paired = (job if isinstance(job, LabelResult) else (job, items[job.image_id]) for job in jobs)
        yield from pool.map(finished, paired, fn, ctx.finish, *args)


def finished(pair: tuple[Any, Item], fn: Callable[..., LabelResult], finish: Callable[[LabelResult, Item], LabelResult],
             *args: Any) -> LabelResult:
    """``finish(fn(job, *args), item)`` for one ``(job, item)`` pair: a pool job of ``run_jobs``."""
    job, item = pair
    return finish(fn(job, *args), item)


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
