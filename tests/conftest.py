"""Shared fixtures: small real samples of the bundled VOC 2012 subset."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import grown_mask
from engine.core.roots import ENV_DATA_ROOTS, ENV_EXPORT_ROOTS
from engine.core.types import Cancelled, Item

# The app starts a worker for its cache by itself (ui.common.keep_worker_alive); the page tests
# queue jobs and read them as queued, so only tests/test_worker_alive.py turns it back on.
os.environ["ISLE_WORKER"] = "off"

REPO = Path(__file__).resolve().parents[1]
VOC_ROOT = (REPO / ".." / "shared" / "data" / "voc2012-animals").resolve()


def _split_ids(split: str) -> list[str]:
    return (VOC_ROOT / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def make_voc_copy(dest: Path, splits: dict[str, list[str]]) -> Path:
    """A VOCdevkit-layout folder at ``dest`` holding copies of the given real images and masks."""
    (dest / "JPEGImages").mkdir(parents=True)
    (dest / "SegmentationClassAug").mkdir()
    (dest / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, ids in splits.items():
        for image_id in ids:
            shutil.copy(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", dest / "JPEGImages")
            shutil.copy(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png", dest / "SegmentationClassAug")
        (dest / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return dest


def split_items(voc: Path, split: str, count: int | None = None) -> list[Item]:
    """The ``Item``s of a split of a VOCdevkit folder (labels from the masks), as the worker builds them."""
    items = []
    for image_id in _read_ids(voc, split)[:count]:
        mask_path = voc / "SegmentationClassAug" / f"{image_id}.png"
        mask = np.asarray(Image.open(mask_path))
        labels = tuple(int(c) for c in np.unique(mask) if 1 <= c <= 20)
        items.append(Item(image_id, voc / "JPEGImages" / f"{image_id}.jpg", mask_path, labels, *mask.shape))
    return items


def _read_ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def job_row(cache_dir: Path, job_id: int) -> dict:
    """The ``jobs`` row of ``job_id``, read as the app reads it."""
    from cache import queries
    from cache.db import connect

    with connect(cache_dir, read_only=True) as con:
        return queries.get_job(con, job_id)


def worker_process(cache_dir: Path, *extra: str) -> subprocess.Popen:
    """``python -m engine worker --processes 1 --flush-seconds 0.1 *extra`` on ``cache_dir``, as a
    separate process (progress recorded every 0.1 s, so a test sees each stage's steps)."""
    env = {**os.environ, "ISLE_CACHE_DIR": str(cache_dir)}
    return subprocess.Popen([sys.executable, "-m", "engine", "worker", "--processes", "1", "--flush-seconds", "0.1",
                             *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(worker: subprocess.Popen, cache_dir: Path, job_id: int, stage: str, done: int) -> dict:
    """SIGKILL ``worker`` once job ``job_id`` reports ``stage`` with at least ``done``; the job row then.

    The worker is killed on a failed wait too, so no stray worker outlives the test."""
    deadline = time.monotonic() + 240
    try:
        while True:
            job = job_row(cache_dir, job_id)
            if job.stage == stage and job.done >= done:
                break
            assert worker.poll() is None, worker.stderr.read()
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    return job_row(cache_dir, job_id)


class Reports:
    """A ``RunContext.report`` that records every call and raises ``Cancelled`` at one (stage, done)."""

    def __init__(self, cancel_at: tuple[str, int] | None = None):
        self.calls: list[tuple[str, int, int]] = []
        self.cancel_at = cancel_at

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.calls.append((stage, done, total))
        if (stage, done) == self.cancel_at:
            raise Cancelled()

    def stage(self, name: str) -> list[tuple[int, int]]:
        """``(done, total)`` of every call of stage ``name``."""
        return [(d, t) for s, d, t in self.calls if s == name]

    def done(self, name: str) -> list[int]:
        return [d for d, _ in self.stage(name)]


@pytest.fixture(scope="session", autouse=True)
def data_roots_for_tests(tmp_path_factory) -> Iterator[Path]:
    """The tests' scratch folders are data roots (read and export), as a lab adds its own with
    ``ISLE_DATA_ROOTS`` / ``ISLE_EXPORT_ROOTS`` (``engine.core.roots``); subprocesses inherit them.
    Session-wide, so session fixtures that queue jobs see them too."""
    base = tmp_path_factory.getbasetemp().resolve()
    saved = {name: os.environ.get(name) for name in (ENV_DATA_ROOTS, ENV_EXPORT_ROOTS)}
    os.environ[ENV_DATA_ROOTS] = os.environ[ENV_EXPORT_ROOTS] = str(base)
    yield base
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """The bundled real data (read-only)."""
    assert VOC_ROOT.is_dir(), f"bundled data missing at {VOC_ROOT}"
    return VOC_ROOT


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """A writable VOCdevkit with 12 real train and 4 real val images."""
    return make_voc_copy(tmp_path / "voc", {"train": _split_ids("train")[:12], "val": _split_ids("val")[:4]})


# A CAM run small enough for tests: a few optimisation steps on small crops, one scale.
TINY_CAM = {"epochs": 1, "batch_size": 4, "crop_size": 160, "scales": [1.0], "flip": False}


@pytest.fixture(scope="session")
def baseline_cache(tmp_path_factory) -> tuple[Path, Path]:
    """``(cache_dir, voc_root)`` after the real worker ran CAM and CAM -> dCRF on 8 real train
    images (tiny CAM training) and scanned the 4 val images."""
    from engine.core.chains import Step
    from engine.runtime.jobs import submit_chain
    from engine.runtime.worker import WorkerConfig, serve

    base = tmp_path_factory.mktemp("baseline")
    root = make_voc_copy(base / "voc", {"train": _split_ids("train")[:8], "val": _split_ids("val")[:4]})
    cache_dir = base / "cache"
    submit_chain(cache_dir, root, "train", [Step("cam", TINY_CAM), Step("dcrf")])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    return cache_dir, root


def grown_label_folder(root: Path, ids: list[str], folder: Path, size: int = 15) -> Path:
    """``folder`` of ``<id>.png`` label maps: the ground truth of ``root`` grown by a ``size`` max
    filter (``grown_mask``), a label-map variant to import that dCRF has work to do on."""
    from cache.labelmaps import write_label_map

    folder.mkdir(parents=True)
    for image_id in ids:
        mask = np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        write_label_map(folder / f"{image_id}.png", grown_mask(mask, size))
    return folder


@pytest.fixture
def cache_copy(baseline_cache, tmp_path) -> tuple[Path, Path, str, list[str]]:
    """A writable copy of the baseline cache (CAM and CAM -> dCRF on 8 real train images, 4 of
    them with 2-3 classes) with two more candidates imported from PNG folders (no scores): the
    ground truth ("GT") and the ground truth grown by 7 pixels ("GT grown"), so that choosing a
    class from "GT grown" and its neighbour from "GT" makes real overlaps."""
    from cache.db import connect
    from cache.labelmaps import write_label_map
    from engine.core.chains import dataset_id_for
    from engine.isle import assignments
    from engine.methods.imported import import_step
    from engine.runtime.jobs import submit_chain
    from engine.runtime.worker import WorkerConfig, serve

    cache_dir, root = baseline_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    dataset_id = dataset_id_for(root)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for name, transform in (("GT", lambda m: np.where(m == 255, 0, m).astype(np.uint8)), ("GT grown", grown_mask)):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        for image_id in ids:
            mask = np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
            write_label_map(folder / f"{image_id}.png", transform(mask))
        submit_chain(copy, root, "train", [import_step(folder, name)])
    serve(WorkerConfig(copy, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(copy, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train") if c.default]
    assert len(candidates) == 4
    return copy, root, dataset_id, candidates
