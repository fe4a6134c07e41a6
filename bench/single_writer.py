"""Benchmark: how many images per second the worker, the cache's only writer, can record, and how
large a cluster it keeps up with at dCRF's per-image cost, both measured in the same run.

    python -m bench.single_writer [--images 10000] [--variants 12] [--record 256] [--flushes 1 2 8 32 128]

1. **A cache at scale**: ``bench.diagnostics.build_scale`` (10,000 images x 12 variants with their
   counts, sweep and confusion rows and totals), so every insert meets the index sizes of a real
   cache. Then a new CAM-like variant is recorded over ``--record`` of its image ids, with the rows
   the worker makes per image (``bench.diagnostics.add_image``: counts, the 12-threshold sweep
   and the confusion cells of real images of the bundled data with synthetic CAMs), in flushes of
   B images, each flush one ``queries.record_results`` in a writer connection of its own as the
   worker's ``_JobRun.flush``. Per B: images/s and rows/s recorded (all tables).
2. **The producer it must keep up with**: ``engine.ops.crf.dcrf_refine`` of the refinement's
   default settings on ``--dcrf-images`` real images (21-class probabilities from synthetic CAMs),
   seconds per image on one core.

The ratio writer images/s ÷ dCRF images/s per core is the number of cores (over all nodes) whose
dCRF results one writer records as fast as they come; divided by cores per node, the nodes.
Times are wall-clock (``time.perf_counter``) on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import diagnostics, honest_isle
from cache import queries
from cache.db import connect
from engine.core.dataset import default_voc_root, read_image
from engine.ops.cams import with_background
from engine.ops.crf import DCRFConfig, dcrf_refine, scores_to_probs


def record_rate(cache_dir: Path, cases: list, image_ids: list[str], flush: int) -> dict[str, float]:
    """Record a new variant over ``image_ids`` (rows of ``cases`` cycled) in flushes of ``flush``
    images; returns images/s, rows/s and ms per flush."""
    variant_id = f"bench-writer-{flush}"
    diagnostics.add_variant(cache_dir, honest_isle.SYNTH_ID, variant_id)
    rows, spent, flushes = 0, 0.0, []
    pending = queries.ResultRows([], [], [])
    for k, image_id in enumerate(image_ids):
        r, cams = cases[k % len(cases)]
        diagnostics.add_image(pending, {step: 0.0 for step in diagnostics.STEPS}, image_id, variant_id, r, cams, True)
        if (k + 1) % flush == 0 or k + 1 == len(image_ids):
            rows += (len(pending.label_maps) + len(pending.counts) + len(pending.sweep) + len(pending.confusion))
            start = time.perf_counter()
            with connect(cache_dir) as con:
                queries.record_results(con, 1, variant_id, pending)
            flushes.append(time.perf_counter() - start)
            spent += flushes[-1]
            pending = queries.ResultRows([], [], [])
    return {"images_s": len(image_ids) / spent, "rows_s": rows / spent, "flush_ms": statistics.median(flushes) * 1000}


def dcrf_seconds(cases: list, count: int) -> float:
    """Median seconds of one ``dcrf_refine`` (default ``DCRFConfig``) per real image, one core."""
    cfg = DCRFConfig()
    times = []
    for r, cams in cases[:count]:
        rgb = np.asarray(read_image(r.image_path))
        probs = scores_to_probs(with_background(cams, diagnostics.THRESHOLD), cfg.clip)
        start = time.perf_counter()
        dcrf_refine(rgb, probs, cfg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images of the scale cache")
    parser.add_argument("--variants", type=int, default=12)
    parser.add_argument("--record", type=int, default=256, help="images recorded per flush size")
    parser.add_argument("--flushes", type=int, nargs="+", default=[1, 2, 8, 32, 128], help="images per flush")
    parser.add_argument("--dcrf-images", type=int, default=8)
    parser.add_argument("--cores-per-node", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start")
    rng = np.random.default_rng(0)
    cases = [(r, diagnostics.synth_cams(r.gt, r.classes, rng)) for r in diagnostics.real_images(default_voc_root(), 40)]
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_single_writer_"))
    try:
        built = diagnostics.build_scale(cache_dir, args.images, args.variants)
        with connect(cache_dir, read_only=True) as con:
            ids = queries.usable_image_ids(con, honest_isle.SYNTH_ID, honest_isle.SPLIT)[:args.record]
        print(f"scale cache: {args.images:,} images x {args.variants} variants, {built['sweep']:,} sweep rows, "
              f"{built['db_mib']:.0f} MiB; recording {len(ids)} images of a new variant per flush size "
              f"(counts, 12-threshold sweep and confusion rows of real images)")
        rates = {flush: record_rate(cache_dir, cases, ids, flush) for flush in args.flushes}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    per_image = dcrf_seconds(cases, args.dcrf_images)
    producer = 1.0 / per_image
    print(f"dCRF (default settings, 21-class probabilities) on {args.dcrf_images} real images: "
          f"{per_image * 1000:.0f} ms/image = {producer:.2f} images/s per core")
    print(f"{'images per flush':>16} {'ms per flush':>12} {'images/s':>9} {'rows/s':>9} {'cores kept up with':>19} "
          f"{'nodes of ' + str(args.cores_per_node):>10}")
    for flush, r in rates.items():
        cores = r["images_s"] / producer
        print(f"{flush:>16} {r['flush_ms']:>12.1f} {r['images_s']:>9.1f} {r['rows_s']:>9.0f} {cores:>19.0f} "
              f"{cores / args.cores_per_node:>10.0f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
