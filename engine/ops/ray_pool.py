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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from engine.core.types import LabelResult

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
