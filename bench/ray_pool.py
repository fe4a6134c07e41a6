"""Benchmark: a dCRF job through a local Ray cluster of 2 CPUs vs the local pool of 2 processes, same run.

    python -m bench.ray_pool [--root DIR] [--images 200] [--repeats 1]

Both sides run the same worker job (``engine.runtime.worker.serve`` in this process): the ``dcrf``
plugin, 10 mean-field iterations, over the first ``--images`` train images of the bundled VOC
subset, from an imported label-map variant (the ground truth grown by 7 pixels, so dCRF starts
from its label unary), the worker writing PNGs, scores and counts as results come.

- **local pool**: ``WorkerConfig(processes=2)``, 2 spawned processes, results in input order.
- **Ray**: ``WorkerConfig(ray_address=...)`` on a cluster started here with
  ``ray.init(num_cpus=2)`` before timing (a cluster outlives its jobs); each image a Ray task
  (``num_cpus=1``), results in order of completion. The Ray worker processes start inside the
  timed job, as the pool's processes do.

The seconds are the job's own (``jobs.started_at`` to ``finished_at``). Prints images/s of both
sides and the ratio Ray / local pool (best of ``--repeats``, the sides alternating).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data import grown_mask, voc_subset
from cache.db import connect
from cache.labelmaps import write_label_map
from engine.core.chains import Step
from engine.core.dataset import default_voc_root
from engine.methods.imported import import_step
from engine.ops.ray_pool import REPO
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve


def base_cache(root: Path, count: int, dest: Path) -> tuple[Path, Path, Step]:
    """``(cache dir, dataset dir, import step)``: a VOC folder of symlinks to ``count`` train images
    of ``root``, scanned, with the grown ground truth imported as a variant."""
    voc, ids = voc_subset(root, count, dest / "voc")
    folder = dest / "gt_grown"
    folder.mkdir()
    for image_id in ids:
        mask = root / "SegmentationClassAug" / f"{image_id}.png"
        write_label_map(folder / f"{image_id}.png", grown_mask(np.asarray(Image.open(mask))))
    step = import_step(folder, "GT grown")
    cache_dir = dest / "cache"
    submit_chain(cache_dir, voc, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=2))
    return cache_dir, voc, step


def dcrf_seconds(base: tuple[Path, Path, Step], dest: Path, ray_address: str | None) -> tuple[float, int]:
    """``(seconds, images recorded)`` of one dCRF job on a copy of the base cache."""
    cache_dir, voc, step = base
    shutil.copytree(cache_dir, dest)
    (job_id,) = submit_chain(dest, voc, "train", [step, Step("dcrf")])
    serve(WorkerConfig(dest, until_idle=True, poll_seconds=0.05, processes=2, ray_address=ray_address))
    with connect(dest, read_only=True) as con:
        status, started, finished, variant = con.execute(
            "SELECT status, started_at, finished_at, variant_id FROM jobs WHERE id = ?", [job_id]).fetchone()
        images = con.execute("SELECT count(*) FROM label_maps WHERE variant_id = ?", [variant]).fetchone()[0]
    if status != "done":
        raise RuntimeError(f"dCRF job {job_id} ended {status}")
    return finished - started, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_voc_root())
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    address = ray.get_runtime_context().gcs_address
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = base_cache(args.root.resolve(), args.images, tmp / "base")
        print(f"dCRF (10 iterations) over {args.images} train images of {args.root}; {os.cpu_count()} CPU cores")
        for repeat in range(args.repeats):
            for side, ray_address in (("local pool", None), ("Ray", address)):
                seconds, images = dcrf_seconds(base, tmp / f"{side}-{repeat}".replace(" ", "_"), ray_address)
                if images != args.images:
                    raise RuntimeError(f"{side}: {images} label maps recorded, expected {args.images}")
                print(f"  run {repeat + 1}, {side:10s}: {seconds:6.1f} s, {images / seconds:5.2f} images/s")
                best[side] = min(best.get(side, seconds), seconds)
    ray.shutdown()
    local, on_ray = args.images / best["local pool"], args.images / best["Ray"]
    print(f"local pool of 2 processes {local:.2f} images/s | Ray, 2 CPUs {on_ray:.2f} images/s | "
          f"ratio Ray / local pool {on_ray / local:.2f}")


if __name__ == "__main__":
    main()
