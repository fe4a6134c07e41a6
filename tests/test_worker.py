"""The worker as a separate process: kill and resume, cancel, dead-worker sweep, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cache import queries
from cache.db import connect
from engine.core.chains import Step, dataset_id_for
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve, sweep_stale_jobs
from tests.conftest import REPO, TINY_CAM, job_row, worker_process

DCRF_5 = [Step("cam", TINY_CAM), Step("dcrf", {"iters": 5})]


def _copy(baseline_cache, dest: Path) -> Path:
    cache_dir, _ = baseline_cache
    shutil.copytree(cache_dir, dest)
    return dest


def _counts(cache_dir: Path, variant_id: str) -> list[tuple]:
    with connect(cache_dir, read_only=True) as con:
        return con.execute(
            "SELECT image_id, class_id, tp, fp, fn FROM counts WHERE variant_id = ? ORDER BY ALL", [variant_id]
        ).fetchall()


def test_killed_worker_resumes_without_redoing_images_and_matches_an_uninterrupted_run(baseline_cache, tmp_path):
    _, root = baseline_cache
    # Uninterrupted reference, in-process.
    reference = _copy(baseline_cache, tmp_path / "reference")
    ref_jobs = submit_chain(reference, root, "train", DCRF_5)
    assert len(ref_jobs) == 1, "CAM is complete in the baseline cache; only the new dCRF variant runs"
    serve(WorkerConfig(reference, until_idle=True, poll_seconds=0.1))

    # The same job in a worker process, killed with SIGKILL once some images are recorded.
    cache_dir = _copy(baseline_cache, tmp_path / "killed")
    (job_id,) = submit_chain(cache_dir, root, "train", DCRF_5)
    variant_id = job_row(cache_dir, job_id).variant_id
    worker = worker_process(cache_dir)
    deadline = time.monotonic() + 120
    while job_row(cache_dir, job_id).done < 2:
        assert worker.poll() is None, worker.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = job_row(cache_dir, job_id)
    assert killed.status == "running" and 2 <= killed.done < 8
    with connect(cache_dir, read_only=True) as con:
        before = {i: (cache_dir / p).stat().st_mtime_ns for i, (p, _) in queries.label_map_rows(con, variant_id).items()}

    restarted = worker_process(cache_dir, "--until-idle")  # sees the dead PID, requeues, resumes
    assert restarted.wait(timeout=300) == 0, restarted.stderr.read()
    job = job_row(cache_dir, job_id)
    assert job.status == "done" and job.attempts == 2 and job.done == 8
    with connect(cache_dir, read_only=True) as con:
        after = queries.label_map_rows(con, variant_id)
    assert len(after) == 8
    for image_id, mtime in before.items():  # finished images were not redone
        assert (cache_dir / after[image_id][0]).stat().st_mtime_ns == mtime
    assert _counts(cache_dir, variant_id) == _counts(reference, variant_id)
    for path, _ in after.values():
        assert (cache_dir / path).read_bytes() == (reference / path).read_bytes()


def test_cancel_stops_the_job_and_keeps_finished_images(baseline_cache, tmp_path):
    _, root = baseline_cache
    cache_dir = _copy(baseline_cache, tmp_path / "cache")
    (job_id,) = submit_chain(cache_dir, root, "train", DCRF_5)
    worker = worker_process(cache_dir, "--until-idle")
    while job_row(cache_dir, job_id).done < 1:
        assert worker.poll() is None, worker.stderr.read()
        time.sleep(0.05)
    from engine.runtime.jobs import cancel

    cancel(cache_dir, [job_id])
    assert worker.wait(timeout=120) == 0
    job = job_row(cache_dir, job_id)
    assert job.status == "cancelled"
    with connect(cache_dir, read_only=True) as con:
        kept = queries.label_map_rows(con, job.variant_id)
    assert 0 < len(kept) < 8 and all((cache_dir / p).is_file() for p, _ in kept.values())
    # Queuing the chain again resumes: only the missing images are labelled.
    (again,) = submit_chain(cache_dir, root, "train", DCRF_5)
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    assert job_row(cache_dir, again).status == "done"
    assert len(_counts(cache_dir, job.variant_id)) > 0


def test_sweep_requeues_a_job_whose_worker_died_and_fails_it_after_max_attempts(baseline_cache, tmp_path):
    cache_dir = _copy(baseline_cache, tmp_path / "cache")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_name = f"{os.uname().nodename}:{dead.stdout.strip()}"
    with connect(cache_dir) as con:
        job_id = queries.insert_job(con, "label", "d", None, "train", None)
        con.execute("UPDATE jobs SET status = 'running', worker = ?, heartbeat_at = ?, attempts = 1 WHERE id = ?",
                    [dead_name, time.time(), job_id])
    assert sweep_stale_jobs(cache_dir, stale_seconds=3600) == [job_id]
    assert job_row(cache_dir, job_id).status == "queued"
    with connect(cache_dir) as con:  # a remote worker silent for too long, out of attempts
        con.execute("UPDATE jobs SET status = 'running', worker = 'elsewhere:1', heartbeat_at = 0, attempts = 3 WHERE id = ?",
                    [job_id])
    assert sweep_stale_jobs(cache_dir, stale_seconds=60) == [job_id]
    job = job_row(cache_dir, job_id)
    assert job.status == "failed" and "3 times" in job.error


def test_bad_inputs_are_reported_by_file_and_the_rest_is_processed(tiny_voc, tmp_path):
    jpg, masks = tiny_voc / "JPEGImages", tiny_voc / "SegmentationClassAug"
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    data = (jpg / f"{ids[0]}.jpg").read_bytes()
    (jpg / f"{ids[0]}.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    mask = Image.open(masks / f"{ids[1]}.png")
    mask.resize((mask.width // 2, mask.height // 2)).save(masks / f"{ids[1]}.png")  # wrong size
    values = np.array(Image.open(masks / f"{ids[2]}.png"))
    values[0, :5] = 42
    Image.fromarray(values).save(masks / f"{ids[2]}.png")  # unknown label value
    (masks / f"{ids[3]}.png").unlink()  # missing mask
    (jpg / f"{ids[4]}.jpg").unlink()  # missing image
    (tiny_voc / "ImageSets/Segmentation/val.txt").write_text("\n")  # empty split list

    cache_dir = tmp_path / "cache"
    scan_id, cam_id = submit_chain(cache_dir, tiny_voc, "train", [Step("cam", TINY_CAM)])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    scan = job_row(cache_dir, scan_id)
    assert scan.status == "done" and "val.txt" in scan.error and "no image ids" in scan.error.lower()
    with connect(cache_dir, read_only=True) as con:
        problems = {p["image_id"]: p["problem"] for p in queries.image_problems(con, dataset_id_for(tiny_voc))}
    assert set(problems) == set(ids[:5])
    assert f"{ids[0]}.jpg" in problems[ids[0]]
    assert f"{ids[1]}.png" in problems[ids[1]] and "250x166" in problems[ids[1]]
    assert "42" in problems[ids[2]]
    assert "missing" in problems[ids[3]] and "missing" in problems[ids[4]]
    cam = job_row(cache_dir, cam_id)
    assert cam.status == "done" and cam.done == cam.total == 7

    # An image that breaks after the scan is skipped with its error; nothing cached is lost.
    with connect(cache_dir, read_only=True) as con:
        variant_id = cam.variant_id
        before = queries.label_map_rows(con, variant_id)
    (jpg / f"{ids[5]}.jpg").write_bytes(b"not a jpeg")
    with connect(cache_dir) as con:
        con.execute("DELETE FROM label_maps WHERE variant_id = ? AND image_id = ?", [variant_id, ids[5]])
    (again,) = submit_chain(cache_dir, tiny_voc, "train", [Step("cam", TINY_CAM)])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    job = job_row(cache_dir, again)
    assert job.status == "done" and job.n_errors == 1
    with connect(cache_dir, read_only=True) as con:
        errors = queries.image_errors(con, again)
        after = queries.label_map_rows(con, variant_id)
    assert errors[0]["image_id"] == ids[5] and f"{ids[5]}.jpg" in errors[0]["message"]
    assert {k: v for k, v in before.items() if k != ids[5]} == after


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_worker_leaves_no_dcrf_processes_behind(baseline_cache, tmp_path):
    _, root = baseline_cache
    cache_dir = _copy(baseline_cache, tmp_path / "cache")
    (job_id,) = submit_chain(cache_dir, root, "train", DCRF_5)
    env = {**os.environ, "ISLE_CACHE_DIR": str(cache_dir)}
    # Progress every 0.1 s: the first record comes while the pool still works on the 8 images.
    worker = subprocess.Popen([sys.executable, "-m", "engine", "worker", "--processes", "2", "--flush-seconds", "0.1"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while job_row(cache_dir, job_id).done < 1:
            assert worker.poll() is None
            time.sleep(0.05)
        pool = [pid for pid in _children(worker.pid)
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert len(pool) == 2  # the two dCRF processes
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pool), "dCRF processes outlived the killed worker"
