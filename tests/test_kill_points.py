"""The worker SIGKILLed inside its recording transaction, at 50 seeded kill points over a real
job (the ground truth of 200 bundled train images as a label set): after the restarts every
image is recorded exactly once, none lost, no row doubled, and the per-split totals equal the
sums of the rows.

The kill is injected by the launcher below, which runs the real worker (``serve``) with
``queries.record_results`` wrapped so that the process SIGKILLs itself before its N-th SQL
statement there; everything else, DuckDB's rollback included, is the product's own."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from cache.db import connect
from engine.core.chains import Step
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import REPO, _split_ids, job_row, make_voc_copy

pytestmark = pytest.mark.timeout(900)

IMAGES = 200
KILLS = 50
SEED = 20261207

LAUNCHER = """
import os, signal, sys
from pathlib import Path
from cache import queries
from engine.runtime.worker import WorkerConfig, serve

cache_dir, kill_at = Path(sys.argv[1]), int(sys.argv[2])
statements = [0]
record_results = queries.record_results


class Dying:
    # the worker's connection, which kills the process before the kill_at-th statement
    def __init__(self, con):
        self.con = con

    def __getattr__(self, name):
        return getattr(self.con, name)

    def execute(self, *args, **kwargs):
        statements[0] += 1
        if statements[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.con.execute(*args, **kwargs)


queries.record_results = lambda con, *args, **kwargs: record_results(Dying(con), *args, **kwargs)
serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1, flush_seconds=0.0))
"""


def test_fifty_kills_inside_the_recording_transaction_lose_and_double_nothing(tmp_path):
    ids = _split_ids("train")[:IMAGES]
    root = make_voc_copy(tmp_path / "voc", {"train": ids})
    cache_dir = tmp_path / "cache"
    submit_chain(cache_dir, root, "train", [])  # the scan alone, before any kill
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    (job_id,) = submit_chain(cache_dir, root, "train", [Step("ground-truth")])
    with connect(cache_dir) as con:  # every death is an attempt: allow them all
        con.execute("UPDATE jobs SET max_attempts = 1000 WHERE id = ?", [job_id])

    rng = random.Random(SEED)
    kills = 0
    while kills < KILLS:
        assert job_row(cache_dir, job_id).status in ("queued", "running"), "the job ended before the kills"
        kill_at = rng.randint(1, 30)  # within the first three flushes: each run records a few images
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(cache_dir), str(kill_at)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == -9, done.stderr  # it died where it was told to, inside the transaction
        kills += 1
    recorded_before_the_end = _label_map_count(cache_dir, job_row(cache_dir, job_id).variant_id)
    assert 0 < recorded_before_the_end < IMAGES

    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))  # the last run, unharmed
    job = job_row(cache_dir, job_id)
    assert job.status == "done" and job.n_errors == 0 and job.done == IMAGES
    with connect(cache_dir, read_only=True) as con:
        maps = con.execute("SELECT count(*), count(DISTINCT image_id) FROM label_maps WHERE variant_id = ?",
                           [job.variant_id]).fetchone()
        counts = con.execute("SELECT count(*), count(DISTINCT (image_id, class_id)), count(DISTINCT image_id) "
                             "FROM counts WHERE variant_id = ?", [job.variant_id]).fetchone()
        confusion = con.execute("SELECT count(*), count(DISTINCT (image_id, gt, pred)) FROM confusion "
                                "WHERE variant_id = ?", [job.variant_id]).fetchone()
        totals = con.execute("SELECT class_id, tp, fp, fn FROM count_totals WHERE variant_id = ? ORDER BY class_id",
                             [job.variant_id]).fetchall()
        sums = con.execute("SELECT class_id, sum(tp), sum(fp), sum(fn) FROM counts WHERE variant_id = ? "
                           "GROUP BY class_id ORDER BY class_id", [job.variant_id]).fetchall()
        files = dict(con.execute("SELECT image_id, path FROM label_maps WHERE variant_id = ?",
                                 [job.variant_id]).fetchall())
    assert maps == (IMAGES, IMAGES)  # 0 lost
    assert counts[0] == counts[1] and counts[2] == IMAGES  # 0 doubled, every image counted
    assert confusion[0] == confusion[1]
    assert totals == sums  # the totals followed every rollback exactly
    assert all(fp == 0 and fn == 0 for _, _, fp, fn in totals)  # the ground truth against itself
    assert sorted(files) == sorted(ids) and all((cache_dir / p).is_file() for p in files.values())


def _label_map_count(cache_dir: Path, variant_id: str) -> int:
    with connect(cache_dir, read_only=True) as con:
        return con.execute("SELECT count(*) FROM label_maps WHERE variant_id = ?", [variant_id]).fetchone()[0]
