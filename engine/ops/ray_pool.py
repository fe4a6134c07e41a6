"""Per-image work of a plugin as Ray tasks (``python -m engine worker --ray ADDRESS``): the
``map`` of ``engine.ops.pool.LazyPool`` (dCRF, SVM expansion, random walks, merges, CAM
labelling) spread over every CPU of a Ray cluster (Moritz et al., "Ray: A Distributed Framework for Emerging AI
Applications", OSDI 2018; docs.ray.io "Tasks", "Fault tolerance").

The worker stays the only process that writes the DuckDB file: a task gets one picklable job (paths
and small arrays), writes its image's files when the worker asked for it (``RunContext.finish``)
and returns its ``LabelResult``, which the worker records by image id. Each task
asks for ``num_cpus=1`` (and ``num_gpus`` when its step needs one); a task whose Ray worker
process dies is run again by Ray (``max_retries``). Images, label maps and scores are read from
their paths on whichever node runs the task, so the dataset and the cache must sit at the same
absolute paths on every node (README, "Per-image work on a Ray cluster"). Ray is imported only
here, when a Ray pool is first used.

A training (``train_remotely``) runs as one Ray task asking for a GPU, when the cluster has one
and the worker's machine has none; its progress and curves come back through a Ray queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.core.types import LabelResult, RunContext

REPO = Path(__file__).resolve().parents[2]


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``host:port`` of its head, as ``ray start --head``
    prints it; ``"auto"``: the cluster ``ray start`` runs on this machine, else a new local one)
    unless this process is connected already.

    Ray workers import the plugins' functions from this repository: ``PYTHONPATH`` is set to
    ``REPO`` for them, so the repository must be at the same path on every node. Raises Ray's
    ``ConnectionError`` when no cluster answers at a given address.
    """
    import ray

    if ray.is_initialized():
        return
    # "auto" in Ray means "join, never start"; ours also starts a local cluster (address None).
    ray.init(address=None if address == "auto" else address, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})


class RayPool:
    """``LazyPool``'s interface on a Ray cluster: ``map(fn, jobs, *args)``, ``close``, ``with``.

    address: as ``connect``; the cluster is joined at the first ``map`` (a run that finds all its
        work stored joins none) and outlives the pool.
    window: tasks in flight at most (default: twice the cluster's CPUs, read at each ``map``).
    num_cpus / num_gpus: resources each task declares (Ray schedules it only where they are free).
    max_retries: how often Ray reruns a task whose worker process or node died.
    """

    def __init__(self, address: str, window: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 max_retries: int = 3):
        if window is not None and window < 1:
            raise ValueError(f"RayPool: window must be at least 1, got {window}")
        self.address, self.window = address, window
        self.num_cpus, self.num_gpus, self.max_retries = num_cpus, num_gpus, max_retries
        self._remote: dict[Callable[..., LabelResult], Any] = {}

    def map(self, fn: Callable[..., LabelResult], jobs: Iterable[Any], *args: Any) -> Iterator[LabelResult]:
        """``fn(job, *args)`` per job as a Ray task, yielded in order of completion (not of
        ``jobs``: callers key results by image id); ``LabelResult`` jobs pass through at once.

        ``fn`` must be a module-level function (Ray workers import it by name); ``args`` are put
        in the object store once per call, not once per task. Closing the generator (cancel)
        cancels the tasks in flight. An exception raised by ``fn`` is raised here (as Ray's
        ``RayTaskError``, an instance of the original type); a task whose process died more than
        ``max_retries`` times raises ``ray.exceptions.WorkerCrashedError``.
        """
        import ray

        connect(self.address)
        task = self._remote.get(fn)
        if task is None:
            task = self._remote[fn] = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                 max_retries=self.max_retries)(fn)
        shared = [ray.put(arg) for arg in args]
        window = self.window or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: list[Any] = []
        jobs = iter(jobs)
        try:
            while True:
                for job in jobs:
                    if isinstance(job, LabelResult):
                        yield job
                        continue
                    pending.append(task.remote(job, *shared))
                    if len(pending) >= window:
                        break
                if not pending:
                    return
                ready, pending = ray.wait(pending, num_returns=1)
                yield ray.get(ready[0])
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        """Forget the remote functions; the cluster and this process's connection stay up."""
        self._remote.clear()

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Relay:
    """A training task's ``report`` or ``log``: puts its calls on a Ray queue that the engine
    worker drains (the task cannot reach the worker's DuckDB connection)."""

    def __init__(self, queue: Any, kind: str):
        self.queue, self.kind = queue, kind

    def __call__(self, *args: Any) -> None:
        self.queue.put((self.kind, args))


def _train_task(train: Callable[[Any, RunContext], Any], cfg: Any, ctx: RunContext) -> None:
    """One training in a Ray worker process, on its node's GPU when Ray gave it one; the model
    files land in ``ctx``'s model store, which the engine worker sees at the same path."""
    import ray
    import torch

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    train(cfg, replace(ctx, device=device))


def cluster_has_gpu(address: str) -> bool:
    """Whether the Ray cluster at ``address`` declares at least one GPU (joins it first)."""
    import ray

    connect(address)
    return ray.cluster_resources().get("GPU", 0) >= 1


def train_remotely(train: Callable[[Any, RunContext], Any], cfg: Any, ctx: RunContext, poll_seconds: float = 0.5,
                   max_retries: int = 3) -> None:
    """``train(cfg, ctx)`` as one Ray task asking for 1 CPU and 1 GPU, until its final model file
    is written; the caller then loads it with ``train(cfg, ctx)`` (a finished training is only
    loaded).

    The task's ``report`` and ``log`` calls travel back through a Ray queue and are replayed on
    ``ctx`` here, so progress, heartbeat, training curves and cancellation work as for a local
    training: a ``Cancelled`` raised by ``ctx.report`` cancels the task (its last checkpoint
    stays). A task whose process or node dies is rerun by Ray (``max_retries``) and resumes from
    its last checkpoint (``engine.ops.training``). ``ctx.workdir`` and ``ctx.models`` must be on
    storage the GPU node sees at the same path. Raises the training's own error, or Ray's
    ``WorkerCrashedError`` after ``max_retries`` deaths.
    """
    import ray
    from ray.util.queue import Empty, Queue

    connect(ctx.ray_address)
    relay = Queue()
    remote = ray.remote(num_cpus=1, num_gpus=1, max_retries=max_retries)(_train_task)
    task_ctx = replace(ctx, todo=(), report=_Relay(relay, "report"), log=_Relay(relay, "log"), variants=None,
                       finish=None, ray_address=None)
    ref = remote.remote(train, cfg, task_ctx)
    finished = False
    last = ("starting on Ray", 0, 1)
    try:
        ctx.report(*last)
        while not finished:
            finished = bool(ray.wait([ref], timeout=poll_seconds)[0])
            reported = False
            while True:
                try:
                    kind, args = relay.get_nowait()
                except Empty:
                    break
                getattr(ctx, kind)(*args)
                if kind == "report":
                    last, reported = args, True
            if not reported:
                ctx.report(*last)  # the heartbeat while the task waits for a GPU or runs a long step
        ray.get(ref)
    finally:
        if not finished:
            ray.cancel(ref, force=True)
        relay.shutdown()
