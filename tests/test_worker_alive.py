"""A worker the app keeps alive (engine/runtime/supervisor.py, ui/worker_panel.py): the workers
table and its heartbeats, one worker started however many ask at once, Stop putting the running
job back in the queue with its finished images kept, two workers on one cache never running the
same job, and the app starting a worker that finishes a job queued from its page (AppTest and a
real ``streamlit run`` in headless Chromium)."""

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
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from streamlit.testing.v1 import AppTest

from cache import queries
from cache.db import connect
from engine.core.chains import Step
from engine.methods.imported import import_step
from engine.runtime import supervisor
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import REPO, _split_ids, grown_label_folder, job_row, make_voc_copy, worker_process
from tests.test_browser import _serve, browser  # noqa: F401  (the browser fixture)

pytestmark = pytest.mark.timeout(300)

IMAGES = 10


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path, Step, Path]:
    """``(cache dir, VOC copy, import step, label folder)``: 10 real train images scanned and
    their ground truth grown by a max filter imported as a label-map variant."""
    base = tmp_path_factory.mktemp("alive")
    ids = _split_ids("train")[:IMAGES]
    root = make_voc_copy(base / "voc", {"train": ids})
    folder = grown_label_folder(root, ids, base / "gt_grown")
    step = import_step(folder, "GT grown")
    cache_dir = base / "cache"
    submit_chain(cache_dir, root, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    return cache_dir, root, step, folder


def _copy(imported, dest: Path) -> Path:
    shutil.copytree(imported[0], dest)
    return dest


def _kill_workers(cache_dir: Path) -> None:
    """SIGKILL every worker of ``cache_dir`` still running, so none outlives its test."""
    for state in supervisor.worker_states(cache_dir):
        if state.alive:
            os.kill(state.row.pid, signal.SIGKILL)


def _wait(predicate, timeout: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _maps(cache_dir: Path, variant_id: str) -> tuple[int, int]:
    with connect(cache_dir, read_only=True) as con:
        return con.execute("SELECT count(*), count(DISTINCT image_id) FROM label_maps WHERE variant_id = ?",
                           [variant_id]).fetchone()


def test_an_idle_worker_heartbeats_and_says_when_it_stopped(imported, tmp_path):
    cache_dir = _copy(imported, tmp_path / "cache")
    worker = worker_process(cache_dir)
    try:
        _wait(lambda: supervisor.live_workers(cache_dir), what="the worker's row")
        (row,) = supervisor.live_workers(cache_dir)
        assert row.pid == worker.pid and row.job_id is None
        first = row.heartbeat_at
        _wait(lambda: supervisor.live_workers(cache_dir)[0].heartbeat_at > first, what="a second heartbeat")
        worker.send_signal(signal.SIGTERM)  # as the Stop button: exit cleanly, saying so
        assert worker.wait(timeout=60) == 0, worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert supervisor.live_workers(cache_dir) == []
    with connect(cache_dir, read_only=True) as con:
        (row,) = [w for w in queries.workers(con, include_stopped=True) if w.pid == worker.pid]
    assert row.stopped_at is not None


def test_one_worker_is_started_however_many_ask_at_once(imported, tmp_path):
    cache_dir = _copy(imported, tmp_path / "cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(supervisor.ensure_worker(cache_dir, automatic=True)))
               for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pids = {pid for _, pid in results}
        assert len(pids) == 1 and None not in pids  # one started; the others saw it starting
        _wait(lambda: supervisor.live_workers(cache_dir), what="the started worker to register")
        assert [w.pid for w in supervisor.live_workers(cache_dir)] == list(pids)
        assert supervisor.ensure_worker(cache_dir, automatic=True)[1] is None  # alive: none started
        assert supervisor.log_path(cache_dir).exists()
    finally:
        _kill_workers(cache_dir)


def test_stop_requeues_the_running_job_and_the_next_worker_finishes_it(imported, tmp_path):
    cache_dir = _copy(imported, tmp_path / "cache")
    _, root, step, _ = imported
    (job_id,) = submit_chain(cache_dir, root, "train", [step, Step("dcrf", {"iters": 30})])
    try:
        supervisor.ensure_worker(cache_dir, ["--processes", "1", "--flush-seconds", "0.1"])
        _wait(lambda: job_row(cache_dir, job_id).done >= 2, what="two images labelled")
        (name,) = supervisor.stop_workers(cache_dir)
        assert supervisor.wait_stopped(cache_dir, [name])
        job = job_row(cache_dir, job_id)
        kept = _maps(cache_dir, job.variant_id)[0]
        assert job.status == "queued" and job.attempts == 0 and job.worker is None
        assert 2 <= kept < IMAGES  # the finished images stay; the rest waits
        # Stopped by a user: the app starts no other by itself; Start (not automatic) does.
        assert supervisor.ensure_worker(cache_dir, automatic=True) == ([], None)
        _, pid = supervisor.ensure_worker(cache_dir, ["--processes", "1"])
        assert pid is not None
        _wait(lambda: job_row(cache_dir, job_id).status == "done", what="the job to finish")
    finally:
        _kill_workers(cache_dir)
    job = job_row(cache_dir, job_id)
    assert job.n_errors == 0 and job.attempts == 1
    assert _maps(cache_dir, job.variant_id) == (IMAGES, IMAGES)
    with connect(cache_dir, read_only=True) as con:
        counts = con.execute("SELECT count(*), count(DISTINCT (image_id, class_id)) FROM counts WHERE variant_id = ?",
                             [job.variant_id]).fetchone()
    assert counts[0] == counts[1]  # no image counted twice


def test_two_workers_on_one_cache_never_run_the_same_job(imported, tmp_path):
    cache_dir = _copy(imported, tmp_path / "cache")
    _, root, step, _ = imported
    job_ids = [submit_chain(cache_dir, root, "train", [step, Step("dcrf", {"iters": iters})])[0]
               for iters in (4, 5, 6, 7, 8, 9)]
    workers = [worker_process(cache_dir, "--until-idle") for _ in range(2)]
    try:
        for worker in workers:
            assert worker.wait(timeout=240) == 0, worker.stderr.read()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    jobs = [job_row(cache_dir, i) for i in job_ids]
    assert all(j.status == "done" and j.attempts == 1 and j.n_errors == 0 for j in jobs)
    assert {j.worker.rsplit(":", 1)[1] for j in jobs} == {str(w.pid) for w in workers}  # both worked
    for job in jobs:
        assert _maps(cache_dir, job.variant_id) == (IMAGES, IMAGES)


def _app_env(monkeypatch, cache_dir: Path, root: Path) -> None:
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    monkeypatch.setenv(supervisor.AUTOSTART_ENV, "auto")
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])


def test_home_starts_a_worker_that_finishes_a_job_queued_from_the_page(imported, tmp_path, monkeypatch):
    cache_dir = _copy(imported, tmp_path / "cache")
    _, root, _, labels = imported
    folder = shutil.copytree(labels, tmp_path / "page_labels")  # another folder: a new variant
    _app_env(monkeypatch, cache_dir, root)
    try:
        at = AppTest.from_file(str(REPO / "app_pages" / "home.py"), default_timeout=60).run()
        assert not at.exception
        _wait(lambda: supervisor.live_workers(cache_dir), what="the worker the page started")
        at.text_input(key="import_folder").input(str(folder))
        at.text_input(key="import_name").input("from the page").run()  # the button enables on a rerun
        at.button(key="queue_import").click().run()
        assert not at.exception
        with connect(cache_dir, read_only=True) as con:
            job = next(j for j in queries.recent_jobs(con) if j.variant_name == "from the page")
        _wait(lambda: job_row(cache_dir, job.id).status == "done", what="the queued job")
        at.run()
        assert any(f"Worker `{supervisor.live_workers(cache_dir)[0].name}`" in m.value for m in at.markdown)
    finally:
        _kill_workers(cache_dir)
    assert _maps(cache_dir, job.variant_id) == (IMAGES, IMAGES)


def test_served_app_starts_a_worker_and_a_job_queued_in_chromium_finishes(imported, tmp_path, browser):  # noqa: F811
    cache_dir = _copy(imported, tmp_path / "cache")
    _, root, _, labels = imported
    folder = shutil.copytree(labels, tmp_path / "browser_labels")
    server, url = _serve(cache_dir, root, **{supervisor.AUTOSTART_ENV: "auto"})
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 90)
        _wait(lambda: supervisor.live_workers(cache_dir), what="the worker the app started")
        name = supervisor.live_workers(cache_dir)[0].name
        wait.until(lambda d: f"Worker {name}" in d.find_element(By.TAG_NAME, "body").text)  # Home shows it
        wait.until(lambda d: d.find_element(By.XPATH, "//*[@role='tab'][contains(., 'Import pseudo-labels')]")).click()
        field = wait.until(lambda d: d.find_element(By.XPATH, "//input[@aria-label='Folder']"))
        field.send_keys(str(folder), Keys.ENTER)
        browser.find_element(By.XPATH, "//input[@aria-label='Name of the variant']").send_keys(
            "from chromium", Keys.ENTER)
        button = wait.until(lambda d: next((b for b in d.find_elements(By.XPATH, "//button[contains(., 'Import')]")
                                           if b.text.strip() == "Import" and b.is_enabled()), None))
        button.click()
        wait.until(lambda d: _job_of(cache_dir, "from chromium") is not None)
        _wait(lambda: _job_of(cache_dir, "from chromium").status == "done", what="the job queued in Chromium")
        # The worker that ran it is the one the app started, still alive and idle on the page.
        assert _job_of(cache_dir, "from chromium").worker == name
        wait.until(lambda d: f"Worker {name} · idle" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        server.terminate()
        server.wait(timeout=20)
        _kill_workers(cache_dir)
    assert _maps(cache_dir, _job_of(cache_dir, "from chromium").variant_id) == (IMAGES, IMAGES)


def _job_of(cache_dir: Path, variant_name: str):
    with connect(cache_dir, read_only=True) as con:
        return next((j for j in queries.recent_jobs(con) if j.variant_name == variant_name), None)


def test_worker_detach_and_stop_from_the_command_line(imported, tmp_path):
    cache_dir = _copy(imported, tmp_path / "cache")
    engine = [sys.executable, "-m", "engine", "--cache", str(cache_dir), "worker"]
    try:
        started = subprocess.run([*engine, "--detach"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0 and "worker started, PID" in started.stdout, started.stderr
        _wait(lambda: supervisor.live_workers(cache_dir), what="the detached worker")
        again = subprocess.run([*engine, "--detach"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "alive already" in again.stdout
        stopped = subprocess.run([*engine, "--stop"], cwd=REPO, capture_output=True, text=True, timeout=90)
        assert stopped.returncode == 0 and "asked to stop" in stopped.stdout, stopped.stderr
        assert supervisor.live_workers(cache_dir) == []
    finally:
        _kill_workers(cache_dir)
