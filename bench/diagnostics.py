"""Benchmark: what the diagnostics (threshold sweep, class confusion) cost the worker and the
diagnostics page, each printed as a ratio against a baseline measured in the same run.

    python -m bench.diagnostics [--root DIR] [--record-images 40] [--cam-images 3] [--images 10000]
                                [--variants 12] [--baseline-images 200] [--repeats 5] [--keep]

Targets (issue 16, printed PASS/FAIL; no absolute time is asserted anywhere else):

1. **Recording, per image** (worker side), on ``--record-images`` real images of ``--root``
   (default the bundled VOC animals subset; the first images of its first split list). CAM-like
   scores are synthesised per image from its real mask, ``(K, H, W) float32`` at full
   resolution: each image class's one-hot mask smoothed (area-downsampled 8x with
   ``engine.ops.scores.downsample_scores`` and bilinearly resized back with ``resize_channels``),
   plus Gaussian noise (sd 0.1), clipped to [0, 1] and scaled to a maximum of 1 per channel, as
   ``normalise_cams`` leaves them. Two arms, the same images, each in a scratch cache made with
   the real calls (``queries.upsert_dataset``, ``replace_split_images``, ``insert_variant``),
   a fresh variant per run so every insert is a first recording:

   - *counts only* (what the worker recorded before): ``engine.ops.cams.cams_to_label`` at 0.3 +
     ``engine.ops.metrics.confusion_counts`` + its ``counts`` rows;
   - *with diagnostics*: that + ``engine.ops.sweep.peak`` + ``sweep_counts`` on ``DEFAULT_GRID``
     (12 thresholds) + ``confusion_pairs`` + their ``sweep_counts`` and ``confusion`` rows.
   The same flush is then recorded into the 10,000-image cache of part 2, to show what a large
   cache adds to the DB side (``record_results`` deletes a re-recorded image's rows first).

   Rows are built as ``engine.runtime.worker._record`` builds them and written through
   ``queries.record_results`` in a writer connection per flush (``cache.db.connect``, one
   transaction), as ``_JobRun.flush`` does; a flush holds the images the worker's 1 s flush
   would at the measured CAM inference time. The arms take turns image by image, the first
   alternating; per arm the best of up to 3 runs. Target: with / without <= 1.5. Beside it, the share
   of a labelling job's time the diagnostics add: their extra time per image over (CAM
   inference + the counts-only recording) per image, the inference measured here:
   ``engine.ops.cams.multiscale_cams`` of an untrained ``engine.methods.cam.build_net(CAMConfig(),
   20)`` (ImageNet backbone) at scales (1.0, 0.5) with flips on ``--cam-images`` real images
   (after one untimed warm-up call).

2. **Reading at 10,000 images x 12 variants** (page side): a scratch cache built with
   ``bench.honest_isle.build`` (images with ground truth and ``counts`` of the 21 VOC classes,
   rows of ``bench.coco_scale.variant_counts``), plus per variant and image ``sweep_counts`` rows
   at the 12 thresholds for the classes of its counts rows (~2.7 per image: the row at 0.30 is
   the counts row, recall and false positives fall as the threshold rises, background takes the
   rest) and ``confusion`` rows derived from the counts rows (TP on the diagonal, an object's FN
   labelled background, its FP on ground-truth background: ~5.6 per image), all inserted from
   Arrow, then ``sweep_totals`` rebuilt from them (the worker keeps them as it records). Each
   read opens and closes a read-only connection as ``ui.common.read`` does (its
   ``st.cache_data`` would serve a repeated call, so this is the first draw or a cache miss);
   median of ``--repeats`` after one untimed call:

   - the threshold slider's redraw: ``cache.diagnostics.sweep_table`` of one variant (the
     split's ``sweep_totals``; a subset, as tuning reads, sums the per-image rows) + the two
     figures ``app_pages/per_class_iou.py`` draws for a threshold other than the variant's
     own: ``ui.charts.sweep_chart`` (mIoU and per-class IoU against the threshold) and the
     per-class heatmap ``ui.charts.iou_heatmap`` with the sweep row (``with_sweep_row``; the
     IoU table, class counts and undecided pixels it needs are read once before, as the page's
     ``read`` cache holds them), target < 100 ms; beside it a slider move whose sweep table
     that cache serves (figures and JSON only);
   - the confusion matrix: ``cache.diagnostics.confusion_matrix`` + ``ui.charts.confusion_cells``
     and ``confusion_heatmap`` (row shares, undecided column), target < 200 ms.

   The figures' JSON serialisation (what ``st.plotly_chart`` sends) is timed apart. Beside
   each, the same figure's numbers computed from the files instead, on ``--baseline-images``
   real images and extrapolated per image to the split (printed as an extrapolation): for the
   sweep, decoding the stored scores (``cache.labelmaps.read_scores`` of ``write_scores``,
   stored as the worker stores them: ``with_background`` at 0.3, long side 128) and the mask,
   resizing the scores back (``resize_channels``), ``peak`` and ``sweep_counts``; for one
   threshold only, decoding the label map (``write_label_map`` of the real mask) and the mask
   and ``confusion_counts`` (a lower bound: a label map holds one threshold); for the confusion
   matrix, label map + mask + ``confusion_pairs``. The OS file cache is warm for all of them.

Times are wall-clock on whatever else the machine runs (``time.perf_counter``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench import honest_isle
from cache import diagnostics, queries, reports
from cache.classes import IGNORE_INDEX, VOC
from cache.db import connect, db_path
from cache.labelmaps import read_label_map, read_scores, write_label_map, write_scores
from cache.rows import Variant
from engine.core.dataset import default_voc_root, image_labels, open_layout, read_image, read_mask
from engine.core.layouts import read_split_ids
from engine.ops.cams import cams_to_label, multiscale_cams, with_background
from engine.ops.metrics import confusion_counts
from engine.ops.scores import downsample_scores, resize_channels
from engine.ops.sweep import DEFAULT_GRID, confusion_pairs, peak, sweep_counts
from ui import charts

DATASET_ID, SPLIT = "bench-diagnostics", "train"
C = VOC.num_classes
THRESHOLD = 0.3  # CAMConfig.bg_threshold: the label the worker stores
SCORE_MAX_SIDE = 128  # CAMConfig.score_max_side
RECORD_TARGET = 1.5  # with diagnostics / counts only
REDRAW_TARGET_MS, MATRIX_TARGET_MS = 100.0, 200.0
FLUSH_SECONDS = 1.0  # engine.runtime.worker.WorkerConfig.flush_seconds
CAM_SCALES = (1.0, 0.5)  # CAMConfig.scales
REDRAW = "slider redraw = sweep_table + figures"
MATRIX = "confusion matrix = confusion_matrix + figure"


@dataclass(frozen=True)
class RealImage:
    """One real image: its mask ``(H, W) uint8`` (255 = ignore) and image-level classes."""

    image_id: str
    image_path: Path
    mask_path: Path
    gt: np.ndarray
    classes: tuple[int, ...]


def real_images(root: Path, count: int) -> list[RealImage]:
    """The first ``count`` images of the root's first split list that have a mask."""
    layout = open_layout(root)
    split = layout.splits[0]
    found = []
    for image_id in read_split_ids(split):
        mask_path = layout.mask_path(split, image_id)
        if mask_path is None or not mask_path.is_file():
            continue
        gt = read_mask(mask_path)
        found.append(RealImage(image_id, layout.image_path(split, image_id), mask_path, gt, image_labels(gt, VOC)))
        if len(found) == count:
            break
    return found


def synth_cams(gt: np.ndarray, classes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """CAM-like scores ``(K, H, W) float32`` in [0, 1] for the ``classes`` of mask ``gt``: each
    one-hot mask (255 read as background) smoothed by an 8x area downsample and bilinear
    upsample, plus N(0, 0.1) noise, clipped, each channel scaled to a maximum of 1."""
    height, width = gt.shape
    if not classes:
        return np.zeros((0, height, width), np.float32)
    onehot = np.stack([(gt == c) for c in classes]).astype(np.float32)
    small = downsample_scores(onehot, max(1, max(height, width) // 8)).astype(np.float32)
    smooth = resize_channels(small, height, width)
    noisy = np.clip(smooth + rng.normal(0.0, 0.1, smooth.shape).astype(np.float32), 0.0, 1.0)
    return (noisy / np.maximum(noisy.max(axis=(1, 2), keepdims=True), 1e-5)).astype(np.float32)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median ms of ``repeats`` calls after one untimed call (first-call imports, the schema check
    of a process's first read-only connection)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


# --- 1. recording ------------------------------------------------------------------------------


def cam_inference_s(images: list[RealImage]) -> float:
    """Seconds per image of ``multiscale_cams`` (scales 1, 0.5, flips) of an untrained CAM net."""
    import torch

    from engine.methods.cam import CAMConfig, build_net

    net = build_net(CAMConfig(), C - 1).eval()
    rgbs = [(read_image(r.image_path), r.classes) for r in images]
    with torch.no_grad():
        multiscale_cams(net, *rgbs[0], CAM_SCALES, True)  # warm-up: first-call allocations
        start = time.perf_counter()
        for rgb, classes in rgbs:
            multiscale_cams(net, rgb, classes, CAM_SCALES, True)
    return (time.perf_counter() - start) / len(rgbs)


STEPS = ("label", "confusion_counts", "peak", "sweep_counts", "confusion_pairs", "record_results")


def _timed(spent: dict[str, float], step: str, fn: Callable[..., Any], *args: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args)
    spent[step] += time.perf_counter() - start
    return out


def add_image(pending: queries.ResultRows, spent: dict[str, float], image_id: str, variant_id: str, r: RealImage,
              cams: np.ndarray, diagnostics_on: bool) -> None:
    """One image's work after inference, its rows added to ``pending`` as
    ``engine.runtime.worker._record`` / ``_queue_sweep`` add them; seconds per step into ``spent``."""
    label = _timed(spent, "label", cams_to_label, cams, r.classes, THRESHOLD)
    counts = _timed(spent, "confusion_counts", confusion_counts, r.gt, label, C)
    pending.label_maps.append((image_id, f"labels/{variant_id}/{image_id}.png", None))
    pending.counts.extend((image_id, c, tp, fp, fn) for c, (tp, fp, fn) in enumerate(counts.tolist())
                          if tp or fp or fn)
    if diagnostics_on:
        score, best = _timed(spent, "peak", peak, cams, r.classes)
        sweep = _timed(spent, "sweep_counts", sweep_counts, r.gt, score, best, DEFAULT_GRID, C)
        pairs = _timed(spent, "confusion_pairs", confusion_pairs, r.gt, label, C)
        pending.confusion.extend((image_id, g, p, n) for g, p, n in pairs.tolist())
        for threshold, by_class in zip(DEFAULT_GRID, sweep.tolist()):
            pending.sweep.extend((image_id, threshold, c, *row) for c, row in enumerate(by_class)
                                 if row[0] or row[1] or row[2])


def flush_rows(cache_dir: Path, variant_id: str, pending: queries.ResultRows, spent: dict[str, float]) -> None:
    """``queries.record_results`` in a writer connection of its own, as ``_JobRun.flush``."""
    start = time.perf_counter()
    with connect(cache_dir) as con:
        queries.record_results(con, 1, variant_id, pending)
    spent["record_results"] += time.perf_counter() - start


def add_variant(cache_dir: Path, dataset_id: str, variant_id: str) -> None:
    with connect(cache_dir) as con:
        queries.insert_variant(con, Variant(
            id=variant_id, dataset_id=dataset_id, name=variant_id, method="cam", step="cam", params={},
            steps=({"name": "cam", "params": {}},), source_id=None, code_version="bench", created_at=time.time()))


def record_both(cache_dir: Path, variant_ids: dict[bool, str], cases: list[tuple[RealImage, np.ndarray]],
                flush: int, first: int = 0) -> dict[bool, dict[str, float]]:
    """Seconds per step (``STEPS``) and in all of both arms (False: counts only, True: with
    diagnostics), each its own variant, labelling ``cases`` (image, cams): the worker's per-image
    work after inference and its flushes of ``flush`` images. The arms take turns image by image
    (which goes first alternating from ``first``), so a change in the machine's load hits both."""
    spent = {on: dict.fromkeys((*STEPS, "total"), 0.0) for on in (False, True)}
    pending = {on: queries.ResultRows([], [], []) for on in (False, True)}
    for k, (r, cams) in enumerate(cases):
        for on in ((False, True) if (k + first) % 2 == 0 else (True, False)):
            start = time.perf_counter()
            add_image(pending[on], spent[on], r.image_id, variant_ids[on], r, cams, on)
            if (k + 1) % flush == 0 or k + 1 == len(cases):
                flush_rows(cache_dir, variant_ids[on], pending[on], spent[on])
                pending[on] = queries.ResultRows([], [], [])
            spent[on]["total"] += time.perf_counter() - start
    return spent


def flush_at_scale(cache_dir: Path, image_ids: Sequence[str], cases: list[tuple[RealImage, np.ndarray]],
                   repeats: int) -> dict[bool, float]:
    """Median ms of ``queries.record_results`` of one flush (``cases``' rows under the ids
    ``image_ids`` of the scale split) for a new variant, counts only and with diagnostics."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats):
        for on in (False, True):
            variant_id = f"bench-flush-{'diag' if on else 'counts'}-{repeat}"
            add_variant(cache_dir, honest_isle.SYNTH_ID, variant_id)
            pending, spent = queries.ResultRows([], [], []), dict.fromkeys(STEPS, 0.0)
            for image_id, (r, cams) in zip(image_ids, cases):
                add_image(pending, spent, image_id, variant_id, r, cams, on)
            flush_rows(cache_dir, variant_id, pending, spent)
            times[on].append(spent["record_results"] * 1000)
    return {on: statistics.median(t) for on, t in times.items()}


def recording(root: Path, n_images: int, cam_images: int, repeats: int) -> dict[str, Any]:
    """Part 1: both arms over the same real images, interleaved, best of ``repeats`` each."""
    rng = np.random.default_rng(0)
    images = real_images(root, n_images)
    cases = [(r, synth_cams(r.gt, r.classes, rng)) for r in images]
    cam_s = cam_inference_s(images[:cam_images])
    flush = max(1, round(FLUSH_SECONDS / cam_s))
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_diagnostics_record_"))
    try:
        with connect(cache_dir) as con:
            queries.upsert_dataset(con, DATASET_ID, "diagnostics bench", str(root), VOC, "vocdevkit")
            queries.replace_split_images(con, DATASET_ID, SPLIT, [
                (r.image_id, str(r.image_path), str(r.mask_path), *r.gt.shape, list(r.classes), None)
                for r in images])
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for repeat in range(repeats):
            variant_ids = {on: f"bench-{'diag' if on else 'counts'}-{repeat}" for on in (False, True)}
            for variant_id in variant_ids.values():
                add_variant(cache_dir, DATASET_ID, variant_id)
            for on, spent in record_both(cache_dir, variant_ids, cases, flush, repeat).items():
                runs[on].append(spent)
        with connect(cache_dir, read_only=True) as con:
            rows = {table: con.execute(f"SELECT count(*) FROM {table} WHERE variant_id = ?",
                                       [f"bench-diag-{repeats - 1}"]).fetchone()[0]
                    for table in ("counts", "sweep_counts", "confusion")}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    best = {on: min(arm, key=lambda s: s["total"]) for on, arm in runs.items()}
    pixels = float(np.mean([r.gt.size for r in images]))
    return {"images": len(images), "pixels": pixels, "cam_s": cam_s, "cam_images": min(cam_images, len(images)),
            "flush": flush, "best": best, "rows": rows, "cases": cases}


def report_recording(r: dict[str, Any]) -> None:
    n = r["images"]
    base, full = r["best"][False], r["best"][True]
    ratio = full["total"] / base["total"]
    extra = (full["total"] - base["total"]) / n
    job = r["cam_s"] + base["total"] / n
    print(f"1. Recording per image: {n} real images (mean {r['pixels'] / 1e3:.0f} kpx), synthetic CAMs at full "
          f"resolution, flushes of {r['flush']} image(s) (the worker's {FLUSH_SECONDS:.0f} s flush at the "
          f"inference time below); best of the runs")
    print(f"   rows per {n} images: counts {r['rows']['counts']:,}, sweep_counts {r['rows']['sweep_counts']:,}, "
          f"confusion {r['rows']['confusion']:,}")
    print(f"   {'ms per image':<34}{'counts only':>12}{'+ diagnostics':>15}")
    for step in (*STEPS, "total"):
        b, f = base[step] * 1000 / n, full[step] * 1000 / n
        print(f"   {step:<34}{b:12.2f}{f:15.2f}")
    print(f"   ratio with / without diagnostics: {ratio:.2f} (target <= {RECORD_TARGET}) "
          f"{'PASS' if ratio <= RECORD_TARGET else 'FAIL'}")
    print(f"   CAM inference (untrained net, scales {CAM_SCALES}, flips; {r['cam_images']} real images): "
          f"{r['cam_s'] * 1000:.0f} ms/image; the diagnostics add {extra * 1000:.2f} ms/image = "
          f"{100 * extra / job:.1f} % of a labelling job's time per image (inference + counts-only recording)")


# --- 2. reading at scale -----------------------------------------------------------------------


def sweep_rows(counts: pa.Table, grid: Sequence[float], n_images: int) -> pa.Table:
    """Synthetic ``sweep_counts`` rows (v, img, threshold, class_id, tp, fp, fn, fp_bg) from the
    counts rows of ``honest_isle.synth`` (recorded at 0.30): per threshold t, an object keeps
    ``exp(-2 (t - 0.3))`` of its TP (at most its ground truth) and ``exp(-5 (t - 0.3))`` of its FP,
    all on background; background takes the rest. Ordered by v, img, threshold, class; only
    rows with tp + fp + fn > 0."""
    v, img, cls = (counts[k].to_numpy().astype(np.int64) for k in ("v", "img", "class_id"))
    tp, fp, fn = (counts[k].to_numpy().astype(np.int64) for k in ("tp", "fp", "fn"))
    t = np.asarray(grid, np.float64)[:, None]  # (J, 1)
    obj = cls > 0
    truth = tp + fn
    tp_j = np.where(obj, np.minimum(truth, np.round(tp * np.exp(-2.0 * (t - 0.3)))), tp).astype(np.int64)
    fp_j = np.where(obj, np.round(fp * np.exp(-5.0 * (t - 0.3))), fp).astype(np.int64)
    fn_j = np.where(obj, truth - tp_j, fn)
    fp_bg = np.where(obj, fp_j, 0)
    key = v * n_images + img  # the (variant, image) of each row
    codes, group = np.unique(key, return_inverse=True)
    for j in range(len(grid)):  # background: ground truth kept, objects' FP taken from it, FN given to it
        taken = np.bincount(group, np.where(obj, fp_j[j], 0), codes.size).astype(np.int64)[group]
        missed = np.bincount(group, np.where(obj, fn_j[j], 0), codes.size).astype(np.int64)[group]
        fn_j[j] = np.where(obj, fn_j[j], np.minimum(truth, taken))
        tp_j[j] = np.where(obj, tp_j[j], truth - fn_j[j])
        fp_j[j] = np.where(obj, fp_j[j], missed)
    n_rows, n_thresholds = cls.size, len(grid)
    table = {"v": np.tile(v, n_thresholds), "img": np.tile(img, n_thresholds),
             "threshold": np.repeat(np.asarray(grid, np.float64), n_rows), "class_id": np.tile(cls, n_thresholds),
             "tp": tp_j.ravel(), "fp": fp_j.ravel(), "fn": fn_j.ravel(), "fp_bg": fp_bg.ravel()}
    keep = (table["tp"] + table["fp"] + table["fn"]) > 0
    order = np.lexsort((table["class_id"], table["threshold"], table["img"], table["v"]))
    order = order[keep[order]]
    return pa.table({k: a[order].astype(np.uint8) if k == "class_id" else a[order] for k, a in table.items()})


def confusion_rows(counts: pa.Table) -> pa.Table:
    """Synthetic ``confusion`` rows (v, img, gt, pred, pixels) from counts rows: (c, c) = TP, and for
    an object class (c, 0) = FN, (0, c) = FP. Ordered by v, img, gt, pred; non-zero cells only."""
    v, img, cls = (counts[k].to_numpy().astype(np.int64) for k in ("v", "img", "class_id"))
    tp, fp, fn = (counts[k].to_numpy().astype(np.int64) for k in ("tp", "fp", "fn"))
    obj = cls > 0
    zero = np.zeros_like(cls)
    gt = np.concatenate([cls, cls[obj], zero[obj]])
    pred = np.concatenate([cls, zero[obj], cls[obj]])
    pixels = np.concatenate([tp, fn[obj], fp[obj]])
    vv, ii = np.concatenate([v, v[obj], v[obj]]), np.concatenate([img, img[obj], img[obj]])
    order = np.lexsort((pred, gt, ii, vv))
    order = order[pixels[order] > 0]
    return pa.table({"v": vv[order], "img": ii[order], "gt": gt[order].astype(np.uint8),
                     "pred": pred[order].astype(np.uint8), "pixels": pixels[order]})


def build_scale(cache_dir: Path, n_images: int, n_variants: int) -> dict[str, Any]:
    """The 10,000-image cache: ``honest_isle.build`` (images, variants, label maps, counts,
    totals), then sweep and confusion rows derived from the same counts rows, and the sweep totals."""
    start = time.perf_counter()
    vids = honest_isle.build(cache_dir, n_images, n_variants)
    counts = honest_isle.synth(n_images, n_variants)["counts"]  # the same seed: the rows build inserted
    sweep, confusion = sweep_rows(counts, DEFAULT_GRID, n_images), confusion_rows(counts)
    with connect(cache_dir) as con:
        con.execute("SET enable_progress_bar = false")
        con.register("synth_sweep", sweep)
        con.register("synth_confusion", confusion)
        variant = "list_extract($vids::VARCHAR[], v + 1)"
        con.execute(f"""INSERT INTO sweep_counts SELECT {variant}, {honest_isle.IMAGE_ID}, threshold, class_id,
                               tp, fp, fn, fp_bg FROM synth_sweep""", {"vids": vids})
        con.execute(f"""INSERT INTO confusion SELECT {variant}, {honest_isle.IMAGE_ID}, gt, pred, pixels
                        FROM synth_confusion""", {"vids": vids})
        queries.rebuild_totals(con, queries.SWEEP_TOTALS, honest_isle.SYNTH_ID, honest_isle.SPLIT)
    with connect(cache_dir) as con:
        con.execute("CHECKPOINT")
    return {"variants": vids, "build_s": time.perf_counter() - start, "counts": counts.num_rows,
            "sweep": sweep.num_rows, "confusion": confusion.num_rows,
            "db_mib": db_path(cache_dir).stat().st_size / 2 ** 20}


def page_reads(cache_dir: Path, variant_id: str, repeats: int) -> dict[str, float]:
    """Median ms of each read and figure as the diagnostics page makes it (``app_pages/per_class_iou.py``:
    a read-only connection per read, its ``ui.charts`` figures), for ``variant_id`` at a grid
    threshold other than its own (the slider moved, so the heatmap gets the sweep row)."""
    def read(fn: Callable[..., Any], *args: Any) -> Any:
        with connect(cache_dir, read_only=True) as con:
            return fn(con, *args)

    ds, split = honest_isle.SYNTH_ID, honest_isle.SPLIT
    usable = read(queries.usable_image_ids, ds, split)
    half = tuple(usable[::2])
    # What the page holds from read()'s cache when the slider moves.
    table = read(reports.iou_table, ds, split)
    class_images = read(queries.class_image_counts, ds, split)
    held = read(diagnostics.undecided, ds, split, tuple(table.variant_ids), C)
    shown, coverage = charts.undecided_rule(table, held, "miss")
    columns = charts.column_order(shown, class_images, "label", None, True)
    sweep = (diagnostics.sweep_table, ds, split, variant_id)
    confusion = (diagnostics.confusion_matrix, ds, split, variant_id)
    cached_sweep, cached_matrix = read(*sweep), read(*confusion)
    grid = cached_sweep.thresholds.tolist()
    own = charts.nearest(grid, THRESHOLD)
    moved = grid[(grid.index(own) + 1) % len(grid)]

    def slider_figures(table_of_sweep: diagnostics.SweepTable) -> list[Any]:
        """The slider's two figures: the sweep curve and the heatmap with the sweep row."""
        with_row, _ = charts.with_sweep_row(shown, coverage, table_of_sweep, moved)
        return [charts.sweep_chart(table_of_sweep, own, moved),
                charts.iou_heatmap(with_row, class_images, "flat", columns, "iou", None)]

    def confusion_figure(matrix: diagnostics.ConfusionMatrix) -> Any:
        rows, cells = charts.confusion_cells(matrix, "miss", True)
        return charts.confusion_heatmap(matrix, rows, cells, "miss", True)

    built_slider, built_matrix = slider_figures(cached_sweep), confusion_figure(cached_matrix)
    return {
        "open + close a read-only connection": median_ms(lambda: read(lambda con: None), repeats),
        "sweep_table (one variant)": median_ms(lambda: read(*sweep), repeats),
        "slider figures: sweep_chart + iou_heatmap with sweep row": median_ms(
            lambda: slider_figures(cached_sweep), repeats),
        "  of which sweep_chart": median_ms(lambda: charts.sweep_chart(cached_sweep, own, moved), repeats),
        "  their to_json (what st.plotly_chart sends)": median_ms(
            lambda: [f.to_json() for f in built_slider], repeats),
        REDRAW: median_ms(lambda: slider_figures(read(*sweep)), repeats),
        "slider move, table cached by read(): figures + to_json": median_ms(
            lambda: [f.to_json() for f in slider_figures(cached_sweep)], repeats),
        "sweep_table on a 50 % subset (image_ids; tuning reads 2)": median_ms(lambda: read(*sweep, half), repeats),
        "confusion_matrix (one variant)": median_ms(lambda: read(*confusion), repeats),
        "confusion figure: confusion_cells + confusion_heatmap": median_ms(
            lambda: confusion_figure(cached_matrix), repeats),
        "  its to_json (what st.plotly_chart sends)": median_ms(lambda: built_matrix.to_json(), repeats),
        MATRIX: median_ms(lambda: confusion_figure(read(*confusion)), repeats),
    }


def baseline_files(root: Path, n_images: int, folder: Path) -> dict[str, float]:
    """Seconds per image of the figures' numbers from files, on ``n_images`` real images written to
    ``folder`` first (untimed): stored scores + mask -> the 12-threshold sweep; label map + mask
    -> counts at one threshold; label map + mask -> the confusion cells."""
    rng = np.random.default_rng(1)
    files = []
    for r in real_images(root, n_images):
        label_path, scores_path = folder / f"{r.image_id}.png", folder / f"{r.image_id}.npz"
        write_label_map(label_path, np.where(r.gt == IGNORE_INDEX, 0, r.gt).astype(np.uint8))
        cams = synth_cams(r.gt, r.classes, rng)
        write_scores(scores_path, (0, *r.classes), downsample_scores(with_background(cams, THRESHOLD), SCORE_MAX_SIDE))
        files.append((r.mask_path, label_path, scores_path))

    def sweep_from_scores() -> None:
        total = np.zeros((len(DEFAULT_GRID), C, 4), np.int64)
        for mask_path, _, scores_path in files:
            gt = read_mask(mask_path)
            classes, scores = read_scores(scores_path)
            cams = resize_channels(scores[1:], *gt.shape)
            total += sweep_counts(gt, *peak(cams, classes[1:]), DEFAULT_GRID, C)

    def counts_from_labels() -> None:
        total = np.zeros((C, 3), np.int64)
        for mask_path, label_path, _ in files:
            total += confusion_counts(read_mask(mask_path), read_label_map(label_path), C)

    def confusion_from_labels() -> None:
        total = np.zeros((C, C + 1), np.int64)
        for mask_path, label_path, _ in files:
            for g, p, n in confusion_pairs(read_mask(mask_path), read_label_map(label_path), C):
                total[g, C if p == IGNORE_INDEX else p] += n

    out = {"images": len(files)}
    steps = (("sweep", sweep_from_scores), ("counts", counts_from_labels), ("confusion", confusion_from_labels))
    for name, fn in steps:
        fn()  # warm the OS file cache
        start = time.perf_counter()
        fn()
        out[name] = (time.perf_counter() - start) / len(files)
    return out


def reading(root: Path, n_images: int, n_variants: int, baseline_images: int, repeats: int,
            flush: list[tuple[RealImage, np.ndarray]], keep: bool) -> dict[str, Any]:
    """Part 2: the scale cache's page reads, one worker flush of ``flush`` (real images and their
    CAMs, recorded under ids of the split) into it, and the file baselines."""
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_diagnostics_scale_"))
    files = Path(tempfile.mkdtemp(prefix="bench_diagnostics_files_"))
    try:
        built = build_scale(cache_dir, n_images, n_variants)
        reads = page_reads(cache_dir, built["variants"][0], repeats)
        with connect(cache_dir, read_only=True) as con:
            ids = queries.usable_image_ids(con, honest_isle.SYNTH_ID, honest_isle.SPLIT)[:len(flush)]
        flushed = flush_at_scale(cache_dir, ids, flush, repeats)
        base = baseline_files(root, baseline_images, files)
    finally:
        shutil.rmtree(files, ignore_errors=True)
        if keep:
            print(f"scratch cache kept at {cache_dir}")
        else:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return {**built, "reads": reads, "baseline": base, "images": n_images, "n_variants": n_variants,
            "flush": flushed, "flush_images": len(flush)}


def report_reading(r: dict[str, Any], repeats: int) -> None:
    n = r["images"]
    print(f"\n2. Reading at {n:,} images x {r['n_variants']} variants, 21 VOC classes: {r['counts']:,} counts rows, "
          f"{r['sweep']:,} sweep_counts rows, {r['confusion']:,} confusion rows; DB {r['db_mib']:.0f} MiB, "
          f"built in {r['build_s']:.0f} s; median of {repeats}, each read opening a read-only connection")
    reads, base = r["reads"], r["baseline"]
    b = base["images"]
    width = max(map(len, reads))
    print(f"   {'read':<{width}}  {'ms':>8}")
    for name, ms in reads.items():
        print(f"   {name:<{width}}  {ms:8.1f}")
    sweep_files = base["sweep"] * n
    counts_files = base["counts"] * n
    confusion_files = base["confusion"] * n
    redraw, matrix = reads[REDRAW], reads[MATRIX]
    print(f"\n   {'figure':<46}{'cached':>10}{'from files (extrapolated)':>28}{'ratio':>9}  target")
    print(f"   {'slider redraw (sweep_table + figures)':<46}{redraw:8.1f} ms"
          f"{sweep_files:24.1f} s  {sweep_files * 1000 / redraw:7.0f}x  < {REDRAW_TARGET_MS:.0f} ms "
          f"{'PASS' if redraw < REDRAW_TARGET_MS else 'FAIL'}")
    print(f"   {'  (files: one threshold from label maps)':<46}{'':10}{counts_files:24.1f} s  "
          f"{counts_files * 1000 / redraw:7.0f}x")
    print(f"   {'confusion matrix (confusion_matrix + figure)':<46}{matrix:8.1f} ms"
          f"{confusion_files:24.1f} s  {confusion_files * 1000 / matrix:7.0f}x  < {MATRIX_TARGET_MS:.0f} ms "
          f"{'PASS' if matrix < MATRIX_TARGET_MS else 'FAIL'}")
    print(f"   from files, per image on {b} real images (x {n:,}): stored scores + mask -> 12-threshold sweep "
          f"{base['sweep'] * 1000:.2f} ms; label map + mask -> counts {base['counts'] * 1000:.2f} ms; "
          f"label map + mask -> confusion cells {base['confusion'] * 1000:.2f} ms")
    f = r["flush"]
    print(f"   one worker flush of {r['flush_images']} image(s) into this cache (record_results, own connection): "
          f"counts only {f[False]:.1f} ms, with diagnostics {f[True]:.1f} ms ({f[True] / f[False]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="a VOCdevkit folder (default: the bundled subset)")
    parser.add_argument("--record-images", type=int, default=40)
    parser.add_argument("--cam-images", type=int, default=3)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--variants", type=int, default=12)
    parser.add_argument("--baseline-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (recording: 3 at most)")
    parser.add_argument("--keep", action="store_true", help="keep the 10,000-image scratch cache")
    args = parser.parse_args()
    root = args.root or default_voc_root()
    start = time.perf_counter()
    print(f"{multiprocessing.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start; {root}")
    recorded = recording(root, args.record_images, args.cam_images, min(args.repeats, 3))
    report_recording(recorded)
    flush = recorded["cases"][:recorded["flush"]]
    report_reading(reading(root, args.images, args.variants, args.baseline_images, args.repeats, flush, args.keep),
                   args.repeats)
    print(f"\nbench total {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
