"""engine/ops/ray_pool.py on a real local Ray cluster (2 CPUs, one declared GPU): the pool's window,
completion order, errors and resources; the dCRF plugin's label maps through Ray byte-identical to
the local pool's; ``python -m engine worker --ray ADDRESS`` with a Ray worker process SIGKILLed
mid-job losing no image and recording none twice; CAM labelling as Ray tasks that load the trained
model, matching the local worker; a training as one Ray task asking for the cluster's GPU, its
progress relayed, a SIGKILLed task rerun by Ray from its checkpoint, a cancel stopping it; a local
run never imports Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from cache.db import connect
from engine.core.chains import Step
from cache.classes import VOC
from engine.core.dataset import default_voc_root
from engine.core.types import Cancelled, LabelResult, RunContext
from engine.methods import cam
from engine.methods.imported import import_step
from engine.ops.ray_pool import REPO, RayPool
from engine.runtime.jobs import submit_chain
from engine.ops.training import torch_threads, trained_model
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import _split_ids, grown_label_folder, job_row, make_voc_copy, split_items, worker_process

pytestmark = pytest.mark.timeout(300)

IMAGES = 10
DCRF = Step("dcrf")  # the default 10 mean-field iterations: ~0.5 s an image, time to kill a task


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster of 2 CPUs and one declared GPU (a resource label: no device is used);
    its GCS address, which other processes join with ``ray.init(address=...)``."""
    # The test module's task functions travel by value: Ray workers cannot import this file.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# --- the pool itself ---------------------------------------------------------------------------


def _sleep_job(job: tuple[str, float]) -> LabelResult:
    name, seconds = job
    time.sleep(seconds)
    return LabelResult(name)


def _failing_job(job: str) -> LabelResult:
    raise ValueError(f"bad job {job}")


def _gpu_job(job: str) -> LabelResult:
    return LabelResult(f"{job}:{ray.get_gpu_ids()}")


def test_results_come_in_order_of_completion_and_errors_pass_through(cluster):
    error = LabelResult("b", error="b.jpg: image file is missing")
    with RayPool(cluster) as pool:
        out = [r.image_id for r in pool.map(_sleep_job, [("slow", 5.0), error, ("fast", 0.0)])]
    assert out == ["b", "fast", "slow"]


def test_window_bounds_tasks_in_flight_and_close_cancels(cluster):
    taken = []

    def jobs():
        for index in range(100):
            taken.append(index)
            yield (str(index), 0.05)

    results = RayPool(cluster, window=3).map(_sleep_job, jobs())
    assert next(results).image_id in {"0", "1", "2"}
    results.close()  # the user cancelled after one image
    assert len(taken) == 3  # nothing beyond the window was taken from the list


def test_a_failing_task_raises_its_error(cluster):
    with pytest.raises(ValueError, match="bad job x"):
        list(RayPool(cluster).map(_failing_job, ["x"]))


def test_a_gpu_task_gets_the_gpu_it_declares(cluster):
    assert [r.image_id for r in RayPool(cluster, num_gpus=1).map(_gpu_job, ["a"])] == ["a:[0]"]
    assert [r.image_id for r in RayPool(cluster).map(_gpu_job, ["a"])] == ["a:[]"]


def test_a_local_run_never_imports_ray(tmp_path):
    code = """
import sys
from cache.classes import VOC
from engine.core.types import LabelResult, RunContext
from engine.ops.pool import run_jobs
import engine.runtime.cli, engine.refine.dcrf, engine.isle.merge
ctx = RunContext(classes=VOC, items=[], todo=[], workdir=__import__("pathlib").Path("."), processes=1)
assert [r.image_id for r in run_jobs(LabelResult, ["a"], ctx)] == ["a"]
assert "ray" not in sys.modules, "ray was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- dCRF jobs through the real worker -----------------------------------------------------------


@pytest.fixture(scope="module")
def imported_cache(tmp_path_factory) -> tuple[Path, Path, Step]:
    """``(cache dir, VOC copy, import step)``: 10 real train images scanned and the ground truth
    grown by 7 pixels imported as a label-map variant (no scores: dCRF's label unary)."""
    base = tmp_path_factory.mktemp("ray")
    root = make_voc_copy(base / "voc", {"train": _split_ids("train")[:IMAGES]})
    folder = grown_label_folder(root, _split_ids("train")[:IMAGES], base / "gt_grown")
    step = import_step(folder, "GT grown")
    cache_dir = base / "cache"
    submit_chain(cache_dir, root, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    return cache_dir, root, step


def _queue_dcrf(imported_cache, dest: Path) -> tuple[Path, int]:
    cache_dir, root, step = imported_cache
    shutil.copytree(cache_dir, dest)
    (job_id,) = submit_chain(dest, root, "train", [step, DCRF])  # the import is complete: only dCRF
    return dest, job_id


def _label_bytes(cache_dir: Path, variant_id: str) -> dict[str, bytes]:
    with connect(cache_dir, read_only=True) as con:
        rows = con.execute("SELECT image_id, path FROM label_maps WHERE variant_id = ?", [variant_id]).fetchall()
    return {image_id: (cache_dir / path).read_bytes() for image_id, path in rows}


# The Ray task of one image (dCRF, CAM labelling): the worker's run_jobs runs the step's function
# and the recording of its result in one task, engine.ops.pool.finished.
DCRF_TASK = "finished"


def _task_pids(name: str) -> list[int]:
    """PIDs of Ray worker processes running a task of function ``name`` now (Ray titles a busy
    worker process ``ray::<function>``, an idle one ``ray::IDLE``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().split(b"\0")[0] == f"ray::{name}".encode():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _serve_on_ray(cache_dir: Path, cluster: str) -> set[int]:
    """Run the cache's queued jobs with ``worker --ray``; the PIDs seen running ``DCRF_TASK`` tasks
    meanwhile (proof the images ran as Ray tasks, not in this process)."""
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(_task_pids(DCRF_TASK))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1, ray_address=cluster))
    finally:
        stop.set()
        watcher.join()
    return seen


@pytest.fixture(scope="module")
def local_labels(imported_cache, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """The dCRF variant's id and label map PNGs made by the local pool of 2 processes."""
    cache_dir, job_id = _queue_dcrf(imported_cache, tmp_path_factory.mktemp("local") / "cache")
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=2))
    job = job_row(cache_dir, job_id)
    assert job.status == "done" and job.n_errors == 0
    labels = _label_bytes(cache_dir, job.variant_id)
    assert len(labels) == IMAGES
    return job.variant_id, labels


def test_dcrf_through_ray_equals_the_local_pool_byte_for_byte(cluster, imported_cache, local_labels, tmp_path):
    variant_id, expected = local_labels
    cache_dir, job_id = _queue_dcrf(imported_cache, tmp_path / "cache")
    seen = _serve_on_ray(cache_dir, cluster)
    job = job_row(cache_dir, job_id)
    assert job.status == "done" and job.n_errors == 0 and job.variant_id == variant_id
    assert seen and os.getpid() not in seen
    assert _label_bytes(cache_dir, variant_id) == expected


def test_worker_ray_loses_no_image_when_a_ray_worker_process_is_killed(cluster, imported_cache, local_labels, tmp_path):
    variant_id, expected = local_labels
    cache_dir, job_id = _queue_dcrf(imported_cache, tmp_path / "cache")
    worker = worker_process(cache_dir, "--until-idle", "--ray", cluster)  # joins the fixture's cluster
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None:
            busy = _task_pids(DCRF_TASK)
            if busy:
                killed = busy[0]
                os.kill(killed, signal.SIGKILL)  # mid-task: this image's task must be retried by Ray
            assert worker.poll() is None, worker.stderr.read()
            assert time.monotonic() < deadline, "no dCRF task seen running"
            time.sleep(0.01)
        assert worker.wait(timeout=180) == 0, worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert not Path(f"/proc/{killed}").exists() or "Z" in Path(f"/proc/{killed}/stat").read_text().rsplit(")", 1)[1][:3]
    job = job_row(cache_dir, job_id)
    assert job.status == "done" and job.n_errors == 0 and job.done == IMAGES
    with connect(cache_dir, read_only=True) as con:
        maps = con.execute("SELECT count(*), count(DISTINCT image_id) FROM label_maps WHERE variant_id = ?",
                           [variant_id]).fetchone()
        counts = con.execute("SELECT count(*), count(DISTINCT (image_id, class_id)), count(DISTINCT image_id) "
                             "FROM counts WHERE variant_id = ?", [variant_id]).fetchone()
        errors = con.execute("SELECT count(*) FROM image_errors WHERE job_id = ?", [job_id]).fetchone()[0]
    assert maps == (IMAGES, IMAGES) and errors == 0
    assert counts[0] == counts[1] and counts[2] == IMAGES  # every image counted, none twice
    assert _label_bytes(cache_dir, variant_id) == expected  # the retried image too


# --- CAM labelling with a loaded model ------------------------------------------------------------


def test_cam_labelling_through_ray_loads_the_trained_model_and_matches_the_local_worker(cluster, tmp_path):
    """CAM's images run as Ray tasks that load the trained model from the cache's model store; with
    the same model file the label maps and counts are the local worker's."""
    from cache.labelmaps import read_label_map
    from tests.conftest import TINY_CAM

    root = make_voc_copy(tmp_path / "voc", {"train": _split_ids("train")[:8]})
    step = Step("cam", TINY_CAM)
    local, remote = tmp_path / "local", tmp_path / "remote"
    *_, local_job = submit_chain(local, root, "train", [step])  # a scan first: the caches are new
    serve(WorkerConfig(local, until_idle=True, poll_seconds=0.05, processes=1))
    *_, remote_job = submit_chain(remote, root, "train", [step])
    shutil.copytree(local / "models", remote / "models")  # the same trained network: only labelling differs
    seen = _serve_on_ray(remote, cluster)
    jobs = job_row(local, local_job), job_row(remote, remote_job)
    assert all(j.status == "done" and j.n_errors == 0 and j.done == 8 for j in jobs)
    assert jobs[0].variant_id == jobs[1].variant_id and seen and os.getpid() not in seen
    query = "SELECT image_id, class_id, tp, fp, fn FROM counts WHERE variant_id = ? ORDER BY ALL"
    rows = []
    for cache_dir in (local, remote):
        with connect(cache_dir, read_only=True) as con:
            paths = dict(con.execute("SELECT image_id, path FROM label_maps WHERE variant_id = ?",
                                     [jobs[0].variant_id]).fetchall())
            rows.append(con.execute(query, [jobs[0].variant_id]).fetchall())
        if cache_dir == local:
            local_paths = paths
    assert sorted(paths) == sorted(local_paths) and len(paths) == 8
    for image_id, path in paths.items():
        ours, theirs = read_label_map(remote / path), read_label_map(local / local_paths[image_id])
        assert (ours != theirs).mean() < 1e-3  # ONNX Runtime on 1 thread per task vs 2: rounding at ties
    assert len(rows[0]) == len(rows[1])


# --- a training as one Ray task on a GPU node -----------------------------------------------------

RAY_CAM = {"epochs": 1, "batch_size": 2, "crop_size": 128, "resize_long": (128, 192), "checkpoint_every": 2}


def _training_ctx(tmp_path: Path, address: str | None, reports: list, cancel_at: int | None = None) -> RunContext:
    items = split_items(default_voc_root(), "train", 40)

    def report(stage: str, done: int, total: int) -> None:
        reports.append((stage, done, total))
        if done == cancel_at:
            raise Cancelled("test")

    return RunContext(classes=VOC, items=items, todo=items, workdir=tmp_path / "work", models=tmp_path / "models",
                      report=report, ray_address=address)


def _trained_weights(tmp_path: Path, address: str | None, reports: list, cancel_at: int | None = None,
                     during=None) -> dict:
    ctx = _training_ctx(tmp_path, address, reports, cancel_at)
    if during is not None:
        ctx.report = during(ctx.report)
    net = trained_model(cam.train, cam.CAMConfig(**RAY_CAM), ctx)
    return {name: value.clone() for name, value in net.state_dict().items()}


def _assert_same_training(ours: dict, reference: dict) -> None:
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name


@pytest.fixture(scope="module")
def local_training(tmp_path_factory) -> dict:
    """The training in this process on 1 torch thread, as in a Ray task of ``num_cpus=1`` (Ray sets
    its ``OMP_NUM_THREADS``), so the weights must be equal bit for bit."""
    with torch_threads(1):
        return _trained_weights(tmp_path_factory.mktemp("local-training"), None, [])


def test_a_training_runs_as_one_ray_task_on_the_gpu_cluster_and_relays_its_progress(cluster, local_training,
                                                                                     tmp_path):
    seen: set[int] = set()

    def watching(report):
        def watched(stage, done, total):
            seen.update(_task_pids("_train_task"))
            report(stage, done, total)
        return watched

    reports: list = []
    weights = _trained_weights(tmp_path, cluster, reports, during=watching)
    assert seen and os.getpid() not in seen  # trained in a Ray worker process
    assert reports[0] == ("starting on Ray", 0, 1)
    steps = [done for stage, done, _ in reports if stage == "train"]
    assert steps[-1] == 20 and set(range(1, 21)) <= set(steps)  # every step's progress came back
    assert (tmp_path / "models" / "cam").is_dir()
    _assert_same_training(weights, local_training)


def test_a_killed_training_task_is_rerun_by_ray_and_resumes_from_its_checkpoint(cluster, local_training, tmp_path):
    killed: list[int] = []
    reruns: set[int] = set()

    def killing(report):
        def kill_once(stage, done, total):
            if stage == "train" and done >= 5 and not killed:
                pids = _task_pids("_train_task")
                assert pids, "no training task running"
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            elif killed:
                reruns.update(_task_pids("_train_task"))
            report(stage, done, total)
        return kill_once

    reports: list = []
    weights = _trained_weights(tmp_path, cluster, reports, during=killing)
    # Ray ran it again in another process (the killed one may still be listed for a moment) ...
    assert killed and reruns - set(killed), "the training task was not seen again after the kill"
    steps = [done for stage, done, _ in reports if stage == "train"]
    assert steps.count(1) == 1 and steps[-1] == 20  # ... from its checkpoint, not from step 0
    _assert_same_training(weights, local_training)


def test_a_cancelled_training_task_stops_and_keeps_its_checkpoint(cluster, tmp_path):
    reports: list = []
    with pytest.raises(Cancelled):
        _trained_weights(tmp_path, cluster, reports, cancel_at=4)
    assert [done for stage, done, _ in reports if stage == "train"][-1] == 4
    assert list((tmp_path / "models" / "cam").glob("*/cam_checkpoint.pt"))
    assert not list((tmp_path / "models" / "cam").glob("*/cam_model.pt"))
    deadline = time.monotonic() + 30
    while _task_pids("_train_task"):  # the task was cancelled, not left training
        assert time.monotonic() < deadline, "the training task still runs"
        time.sleep(0.1)
