"""Disk full while the worker writes label maps: the cache's ``labels/`` folder on a small tmpfs
the test mounts (root only). The job fails with an error naming the file and the free space, no
half-written file is left, the cache stays readable, and once space is freed the job queued again
completes, every image recorded exactly once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cache import queries
from cache.db import connect
from engine.core.chains import Step, dataset_id_for
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import _split_ids, job_row, make_voc_copy

pytestmark = pytest.mark.timeout(300)

IMAGES = 12


@pytest.fixture
def small_labels_fs(tmp_path) -> Path:
    """``<cache>/labels`` as a 512 KiB tmpfs, unmounted afterwards."""
    labels = tmp_path / "cache" / "labels"
    labels.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(labels)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root here: {done.stderr.strip()}")
    yield labels
    subprocess.run(["umount", "-l", str(labels)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``folder``'s filesystem."""
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_fails_the_job_clearly_and_it_completes_once_space_is_freed(small_labels_fs, tmp_path):
    cache_dir = small_labels_fs.parent
    ids = _split_ids("train")[:IMAGES]
    root = make_voc_copy(tmp_path / "voc", {"train": ids})
    step = Step("ground-truth")
    filler = _fill(small_labels_fs, 30_000)  # room for a few palette PNGs, not for all
    *_, first = submit_chain(cache_dir, root, "train", [step])  # a scan first: the cache is new
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))

    job = job_row(cache_dir, first)
    assert job.status == "failed"
    assert "DiskFull" in job.error and "no space left on its device" in job.error
    assert str(small_labels_fs / job.variant_id) in job.error  # the file being written is named
    with connect(cache_dir, read_only=True) as con:  # the cache stays readable
        kept = dict(con.execute("SELECT image_id, path FROM label_maps WHERE variant_id = ?",
                                [job.variant_id]).fetchall())
    assert 0 < len(kept) < IMAGES
    written = sorted(p.name for p in (small_labels_fs / job.variant_id).iterdir())
    assert written == sorted(f"{i}.png" for i in kept)  # no temporary or half file left
    before = {i: (cache_dir / p).read_bytes() for i, p in kept.items()}

    filler.unlink()  # space freed: the same chain queued again resumes
    (again,) = submit_chain(cache_dir, root, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    job = job_row(cache_dir, again)
    assert job.status == "done" and job.n_errors == 0
    with connect(cache_dir, read_only=True) as con:
        maps = con.execute("SELECT count(*), count(DISTINCT image_id) FROM label_maps WHERE variant_id = ?",
                           [job.variant_id]).fetchone()
        counts = con.execute("SELECT count(*), count(DISTINCT (image_id, class_id)) FROM counts WHERE variant_id = ?",
                             [job.variant_id]).fetchone()
        usable = queries.usable_image_ids(con, dataset_id_for(root), "train")
    assert maps == (IMAGES, IMAGES) and len(usable) == IMAGES
    assert counts[0] == counts[1]  # no image counted twice
    assert all((cache_dir / kept[i]).read_bytes() == data for i, data in before.items())  # kept as they were
