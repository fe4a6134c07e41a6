"""The background worker: takes queued jobs from the cache and runs them, one at a time.

Job states (``cache.schema.JobStatus``) move only here: queued -> running -> done | failed |
cancelled, one guarded UPDATE per change. A running job writes a heartbeat with its progress; a
job whose worker died (a dead local PID, or a heartbeat older than ``stale_seconds``) is queued
again while attempts remain. Label maps are written one by one and recorded in batches, so a
restarted job skips every image already recorded: nothing finished is redone or lost.

Only this process writes the DuckDB file; it holds it for a few milliseconds per batch
(``cache.db.connect``), so the app can read in between. A result's label map and scores are
written (atomically) and its rows counted by ``engine.runtime.recording.Recorder`` where the result
is made: a pool process or Ray task for ``run_jobs`` steps, else here. A file written but not yet
recorded when a job is killed is written again when the job resumes.

A serving worker has a ``workers`` row with a heartbeat written at every poll and flush, idle or
not (``engine.runtime.supervisor`` reads it to keep one alive). Asked to stop (its row's
``stop_requested``, or SIGTERM), it records its finished images, puts its job back in the queue
(``StopRequested``) and exits; the next worker resumes the job where it stopped. Several workers
may serve one cache: a job is claimed by one guarded UPDATE, so two never run the same job.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache import queries
from cache.db import connect
from cache.labelmaps import LabelMapError, read_label_map
from cache.rows import Dataset, ImageRow, Job
from cache.schema import JobStatus
from engine.core import registry
from engine.core.dataset import DatasetError, ImageRecord, open_layout, scan_split, to_item
from engine.core.types import Cancelled, ImageError, Item, LabelResult, Recorded, RunContext, SourceVariant
from engine.ops.sweep import DEFAULT_GRID, check_grid
from engine.runtime.recording import Recorder, count_rows

log = logging.getLogger("isle.worker")

ProgressFn = Callable[[Job, str, int, int], None]


class StopRequested(Cancelled):
    """The worker was asked to stop mid-job: the job goes back to the queue, not to cancelled.
    A ``Cancelled`` to the plugins, so they unwind as for a cancel."""


_signalled = threading.Event()  # SIGTERM or SIGINT seen by ``serve``: stop as if asked in the cache


@dataclass(frozen=True)
class WorkerConfig:
    cache_dir: Path
    poll_seconds: float = 1.0
    stale_seconds: float = 120.0  # no heartbeat for this long: the job's worker is presumed dead
    flush_seconds: float = 1.0  # how often results and progress are written to the cache
    processes: int = 2  # for per-image CPU work (dCRF)
    # per-image work as Ray tasks on this cluster (engine.ops.ray_pool; "auto": this machine's); None: local processes
    ray_address: str | None = None
    until_idle: bool = False  # stop when no job is queued or running
    # background thresholds at which a threshold-sweep plugin's labels are also counted
    sweep_grid: tuple[float, ...] = DEFAULT_GRID

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep_grid", check_grid(self.sweep_grid))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _worker_is_dead(name: str | None, heartbeat_at: float | None, stale_seconds: float) -> bool:
    host, _, pid = (name or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return heartbeat_at is None or time.time() - heartbeat_at > stale_seconds


def sweep_stale_jobs(cache_dir: Path, stale_seconds: float) -> list[int]:
    """Requeue (or fail, when out of attempts) running jobs whose worker died; returns their ids."""
    swept = []
    with connect(cache_dir) as con:
        for job in queries.running_jobs(con):
            if job.worker != worker_name() and _worker_is_dead(job.worker, job.heartbeat_at, stale_seconds):
                if queries.requeue_stale_job(con, job.id, job.heartbeat_at):
                    log.warning("job %s: worker %s is gone; requeued or failed", job.id, job.worker)
                    swept.append(job.id)
    return swept


def torch_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu": where plugins run and what stage costs are measured on."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _item(row: ImageRow) -> Item:
    """An ``images`` row as the ``Item`` plugins receive (through the dataset's own converter)."""
    return to_item(ImageRecord(
        image_id=row.image_id, split=row.split, image_path=Path(row.image_path),
        mask_path=Path(row.mask_path) if row.mask_path else None, height=int(row.height),
        width=int(row.width), labels=row.labels, problem=row.problem,
    ))


class _JobRun:
    """One running job: progress reporting, cancel checks, and batched recording of results."""

    def __init__(self, cfg: WorkerConfig, job: Job, on_progress: ProgressFn | None):
        self.cfg, self.job, self.on_progress = cfg, job, on_progress
        self.stage, self.done, self.total, self.n_errors = "start", 0, 0, 0
        self.pending = queries.ResultRows([], [], [])
        self.last_flush = 0.0
        # Measured stage costs (``stage_costs``): the step's registry name (set by the label job),
        # each stage's last ``done`` in this run, the last report's (stage, monotonic time), and
        # the units and seconds not recorded yet, per stage.
        self.plugin = job.kind
        self.stage_done: dict[str, int] = {}
        self.mark: tuple[str, float] | None = None
        self.costs: dict[str, list[float]] = {}

    def report(self, stage: str, done: int, total: int) -> None:
        """Progress from a plugin (e.g. training steps); raises ``Cancelled`` if asked to stop.
        A change of stage records the costs measured so far (``_measure``)."""
        ended = self._measure(stage, done, time.monotonic())
        self.stage, self.done, self.total = stage, done, total
        if self.on_progress:
            self.on_progress(self.job, stage, done, total)
        if ended or time.monotonic() - self.last_flush >= self.cfg.flush_seconds:
            self.flush()

    def _measure(self, stage: str, done: int, now: float) -> bool:
        """Count the units and seconds since the previous report towards ``stage``; True when the
        previous report was of another stage (that stage ended, for now).

        A stage's first report in this run is its starting mark (a resumed job's first ``done``
        counts nothing); the time from the previous report is counted only when ``stage`` was
        reported before in this run (CAM's labelling, resumed after its training), so units and
        seconds always cover the same span."""
        ended = self.mark is not None and self.mark[0] != stage
        last = self.stage_done.get(stage)
        if last is not None and self.mark is not None:
            cost = self.costs.setdefault(stage, [0, 0.0])
            cost[0] += max(0, done - last)
            cost[1] += now - self.mark[1]
        self.stage_done[stage] = done
        self.mark = (stage, now)
        return ended

    def log(self, name: str, step: int, value: float) -> None:
        """A training curve point from a plugin; recorded with the next flush."""
        self.pending.curve.append((name, int(step), float(value)))

    def flush(self) -> None:
        with connect(self.cfg.cache_dir) as con:
            if self.job.kind in ("label", "recount"):
                queries.record_results(con, self.job.id, self.job.variant_id, self.pending)
            cancel = queries.set_progress(con, self.job.id, self.stage, self.done, self.total, self.n_errors)
            stop = queries.worker_heartbeat(con, worker_name(), self.job.id) or _signalled.is_set()
            measured = [(stage, int(units), seconds) for stage, (units, seconds) in self.costs.items() if units]
            if measured:
                queries.record_stage_costs(con, self.job.id, self.plugin, torch_device(), measured)
                self.costs = {stage: cost for stage, cost in self.costs.items() if not cost[0]}
        self.pending = queries.ResultRows([], [], [])
        self.last_flush = time.monotonic()
        if stop:
            raise StopRequested(f"job {self.job.id}: worker {worker_name()} asked to stop")
        if cancel:
            raise Cancelled(f"job {self.job.id} cancelled")


def _run_scan(run: _JobRun, dataset: Dataset) -> str | None:
    """Record every split's images; a broken split list is reported (returned) and the other
    splits stay usable, so the job still ends done."""
    layout = open_layout(Path(dataset.root))  # raises DatasetError for a malformed dataset
    with connect(run.cfg.cache_dir) as con:
        queries.upsert_dataset(con, dataset.id, dataset.name, dataset.root, layout.classes, layout.layout_name)
    splits = [s.name for s in layout.splits]
    problems = []
    for index, split in enumerate(splits):
        run.report(f"scan {split}", index, len(splits))
        try:
            records = scan_split(layout, split, processes=run.cfg.processes)
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        rows = [(r.image_id, str(r.image_path), str(r.mask_path) if r.mask_path else None,
                 r.height, r.width, list(r.labels), r.problem) for r in records]
        with connect(run.cfg.cache_dir) as con:
            queries.replace_split_images(con, dataset.id, split, rows)
        run.n_errors += sum(r.problem is not None for r in records)
    with connect(run.cfg.cache_dir) as con:
        queries.mark_scanned(con, dataset.id)
    run.report("scanned", len(splits), len(splits))
    return "; ".join(problems) or None


def _record(run: _JobRun, result: LabelResult, item: Item, recorder: Recorder) -> None:
    """Queue one result's rows (its files written by ``recorder``, here or already in the pool
    process that made it); bad results become per-image errors."""
    result = recorder(result, item)
    if result.error is not None:
        run.n_errors += 1
        run.pending.errors.append((item.image_id, result.error))
        log.warning("job %s: %s", run.job.id, result.error)
        return
    _queue(run, item.image_id, result.recorded)


def _queue(run: _JobRun, image_id: str, rows: Recorded) -> None:
    run.pending.counts.extend((image_id, *row) for row in rows.counts)
    run.pending.confusion.extend((image_id, *row) for row in rows.confusion)
    run.pending.sweep.extend((image_id, *row) for row in rows.sweep)
    run.pending.conflicts.extend((image_id, *row) for row in rows.conflicts)
    run.pending.label_maps.append((image_id, rows.label_path, rows.scores_path))


def _variant_reader(cache_dir: Path, variant_id: str, rows: dict[str, tuple[str, str | None]]) -> SourceVariant:
    """Read access to a variant's files from its ``label_map_rows``."""
    def file(image_id: str, column: int) -> Path | None:
        if image_id not in rows:
            raise ImageError(f"variant {variant_id} has no label map for image {image_id}")
        value = rows[image_id][column]
        return cache_dir / value if value else None

    return SourceVariant(lambda i: file(i, 0), lambda i: file(i, 1), variant_id)


def _run_label(run: _JobRun, dataset: Dataset) -> None:
    cache_dir = run.cfg.cache_dir
    job = run.job
    with connect(cache_dir, read_only=True) as con:
        variant = queries.get_variant(con, job.variant_id)
        rows = queries.usable_images(con, dataset.id, job.split)
        finished = queries.label_map_rows(con, variant.id)
        source_rows = queries.label_map_rows(con, variant.source_id) if variant.source_id else None
        source_split = queries.variant_split(con, variant.source_id) if variant.source_id else None
        source_images = queries.usable_images(con, dataset.id, source_split) if source_split else []
    if not rows:
        raise DatasetError(f"split {job.split!r} of {dataset.root} has no usable images")
    plugin = registry.get(variant.step)
    run.plugin = plugin.name
    refusal = plugin.refusal(dataset.classes)
    if refusal:
        raise ValueError(refusal)
    cfg = plugin.make_config(variant.params)
    items = [_item(r) for r in rows]
    by_id = {it.image_id: it for it in items}
    todo = [it for it in items if it.image_id not in finished]

    source = _variant_reader(cache_dir, variant.source_id, source_rows) if source_rows is not None else None

    def open_variant(variant_id: str) -> SourceVariant:
        with connect(cache_dir, read_only=True) as con:
            if queries.get_variant(con, variant_id) is None:
                raise KeyError(f"no variant {variant_id!r} in the cache")
            return _variant_reader(cache_dir, variant_id, queries.label_map_rows(con, variant_id))

    recorder = Recorder(cache_dir, variant.id, dataset.classes, run.cfg.sweep_grid)
    ctx = RunContext(classes=dataset.classes, items=items, todo=todo, workdir=cache_dir / "work" / variant.id, device=torch_device(),
                     report=run.report, source=source, processes=run.cfg.processes, ray_address=run.cfg.ray_address,
                     models=cache_dir / "models", variants=open_variant, log=run.log, finish=recorder,
                     source_items=[_item(r) for r in source_images if r.image_id in (source_rows or {})])
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    done = len(items) - len(todo)
    run.report("label", done, len(items))
    if not todo:
        return
    for result in plugin.run(cfg, ctx):
        _record(run, result, by_id[result.image_id], recorder)
        done += 1
        run.report("label", done, len(items))


def _run_recount(run: _JobRun, dataset: Dataset) -> None:
    """Count a variant's stored label maps again against the ground truth: its counts and class
    confusion, for the images with ground truth that have no confusion rows yet (a variant
    recorded before schema 8). Label maps and scores stay as they are; a threshold sweep needs
    the full-resolution scores and is not made. Resumes with the images not recounted yet."""
    cache_dir, job = run.cfg.cache_dir, run.job
    with connect(cache_dir, read_only=True) as con:
        rows = queries.usable_images(con, dataset.id, job.split)
        maps = queries.label_map_rows(con, job.variant_id)
        done = queries.confused_images(con, job.variant_id)
    todo = [_item(r) for r in rows if r.mask_path and r.image_id in maps and r.image_id not in done]
    run.report("recount", 0, len(todo))
    for count, item in enumerate(todo, start=1):
        path, scores_path = maps[item.image_id]
        try:
            rows = count_rows(item, read_label_map(cache_dir / path), None, dataset.classes, run.cfg.sweep_grid)
        except (LabelMapError, ImageError, OSError, ValueError) as exc:
            run.n_errors += 1
            run.pending.errors.append((item.image_id, f"{cache_dir / path}: {exc}"))
        else:
            _queue(run, item.image_id, Recorded(path, scores_path, *rows))
        run.report("recount", count, len(todo))


def run_job(cfg: WorkerConfig, job: Job, on_progress: ProgressFn | None = None) -> JobStatus:
    """Run a claimed job to its end state and record it."""
    run = _JobRun(cfg, job, on_progress)
    with connect(cfg.cache_dir, read_only=True) as con:
        dataset = queries.get_dataset(con, job.dataset_id)
    status, error = JobStatus.DONE, None
    try:
        if job.kind == "scan":
            error = _run_scan(run, dataset)
        elif job.kind == "recount":
            _run_recount(run, dataset)
        else:
            _run_label(run, dataset)
        run.flush()
    except StopRequested:
        status = JobStatus.QUEUED
    except Cancelled:
        status = JobStatus.CANCELLED
    except Exception as exc:  # the job fails, the worker goes on
        status, error = JobStatus.FAILED, f"{type(exc).__name__}: {exc}"
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
    if status is not JobStatus.DONE:
        try:
            run.flush()  # keep every finished image
        except Cancelled:
            pass
    with connect(cfg.cache_dir) as con:
        if status is JobStatus.QUEUED:
            queries.requeue_job(con, job.id)
        else:
            queries.finish_job(con, job.id, status, error)
    return status


def run_next(cfg: WorkerConfig, on_progress: ProgressFn | None = None) -> bool:
    """Claim and run the oldest runnable job; False when there was none."""
    with connect(cfg.cache_dir) as con:
        for job in queries.runnable_jobs(con):
            if job.cancel_requested:
                queries.cancel_queued_job(con, job.id)
            elif job.dependency_status in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
                queries.fail_queued_job(con, job.id, f"job {job.depends_on} it depends on {job.dependency_status}")
            elif queries.claim_job(con, job.id, worker_name()):
                claimed = queries.get_job(con, job.id)
                break
        else:
            return False
    log.info("job %s (%s) started", claimed.id, claimed.kind)
    status = run_job(cfg, claimed, on_progress)
    log.info("job %s %s", claimed.id, status.value)
    return True


def _on_signal(signum: int, frame: object) -> None:
    if _signalled.is_set():  # a second Ctrl-C: stop now (the job is requeued when its heartbeat ages)
        raise KeyboardInterrupt
    log.warning("worker %s: signal %s, stopping after recording the finished images", worker_name(), signum)
    _signalled.set()


def serve(cfg: WorkerConfig, on_progress: ProgressFn | None = None) -> None:
    """The worker loop: register, sweep dead workers' jobs, run jobs, poll with a heartbeat.

    Returns when asked to stop (``workers.stop_requested``, or SIGTERM / SIGINT when called on the
    main thread), and with ``until_idle`` when no job is queued or running; the row then says it
    stopped. A job running at a stop is put back in the queue with its finished images recorded.
    """
    name = worker_name()
    with connect(cfg.cache_dir) as con:
        queries.register_worker(con, name, socket.gethostname(), os.getpid(), cfg.ray_address)
    _signalled.clear()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not _signalled.is_set():
            with connect(cfg.cache_dir) as con:
                if queries.worker_heartbeat(con, name, None):
                    log.info("worker %s: asked to stop", name)
                    return
            sweep_stale_jobs(cfg.cache_dir, cfg.stale_seconds)
            if run_next(cfg, on_progress):
                continue
            if cfg.until_idle:
                with connect(cfg.cache_dir, read_only=True) as con:
                    if not queries.has_unfinished_jobs(con):
                        return
            _signalled.wait(cfg.poll_seconds)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        with connect(cfg.cache_dir) as con:
            queries.worker_stopped(con, name)
