"""Benchmark: the honest-ISLE numerics (bootstrap, cross-validation, budget curve) against a plain
loop that recomputes the per-class IoU table from the counts table per resample, same run.

    python -m bench.honest_isle [--cache DIR] [--root DIR] [--images 10000] [--variants 12]
                                [--resamples 1000] [--loop 10] [--repeats 3] [--keep]

Targets, from the issue asking for them (printed PASS/FAIL): "The bootstrap and the
cross-validation over the bundled train split with the 11 existing candidates: under 2 s each on
2 cores; the budget curve (7 sizes x 20 draws) under 10 s; at 10,000 images x 12 candidates under
10 s each. Print them beside a plain loop that recomputes the per-class IoU from the counts table
per resample."

Two cases, each read through one read-only connection (``cache.db.connect``):

- **A, the real cache** (``--cache``, default ``cache.db.default_cache_dir()``): the train split of
  the dataset registered for ``--root`` (``engine.core.chains.dataset_id_for``, default the
  bundled VOC animals subset) with every default candidate of ``assignments.complete_variants``.
  Skipped with a message when that cache, dataset or candidates are missing.
- **B, synthetic**: a scratch cache (deleted unless ``--keep``) of ``--images`` images with ground
  truth x ``--variants`` candidates x the 21 VOC classes, rows drawn with a fixed seed and written
  through DuckDB from Arrow: 1 + Poisson(0.5) object classes per image (at most 5, frequency
  1 / rank^0.8), per candidate and class a skill around the candidate's quality (so classes
  choose different candidates), object recall ~ Beta around it (5 % missed), false positives on
  held classes and, in 15 % of the images, on one class the image does not hold; background
  rows absorb both (the rows of one variant: ``bench.coco_scale.variant_counts``).

Timed per case (``time.perf_counter``; best of ``--repeats``, the two slow whole calls once):
the load (``reports.image_counts`` of the split, one query); the bootstrap
(``validation.bootstrap_weights`` + ``resampled_iou`` + ``confidence`` of Algorithm 2's choice
on the whole split, B = ``--resamples``); the 5-fold cross-validation (``validation.folds`` and
``cross_validate`` of Algorithm 2 and of the stable rule, whose own bootstrap runs per fold);
``assignments.validate`` as a whole (load + bootstrap + both cross-validations); and
``assignments.budget_curve`` of the plan on ``Subset(0.5, seed=0)`` (7 sizes x 20 draws, the
stable rule bootstrapping each draw).

Baseline, the plain loop: one DuckDB aggregation of the ``counts`` rows joined with the
resample's (image id, multiplicity) pairs, weighted sums of TP, FP, FN per candidate and class,
then IoU (an IN-list would drop repeated images). Its time per resample is the best of
``--loop`` resamples at each number of images the computation resamples; a step's baseline is
the number of IoU tables the loop would compute times that time: B for the bootstrap, per fold
B + 2 for the two cross-validations (the training folds' table, shared by both rules and the best
single candidate, its B resamples, the held-out table), per draw of the budget curve B + 1 (plus
the report subset's table once). The first ``--loop`` resamples of the full-split bootstrap are
the loop's, and their IoU must equal ``resampled_iou``'s (asserted), so both do the same work.
Then the peak RSS of the process (``resource.getrusage``, the synthetic build included).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from bench.coco_scale import variant_counts
from cache import queries, reports
from cache.classes import VOC
from cache.db import connect, default_cache_dir, db_path
from cache.rows import Variant
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root
from engine.isle import assignments, validation
from engine.isle.assignments import AssignRule
from engine.isle.numerics import Subset

T = TypeVar("T")
SPLIT, K, DRAWS = "train", 5, 20
SYNTH_ID, SYNTH_ROOT = "voc-synthetic", "/synthetic/voc2012"
IMAGE_ID = "'2012_' || lpad(img::VARCHAR, 6, '0')"

LOOP_SQL = """
    WITH drawn AS (SELECT unnest($ids::VARCHAR[]) AS image_id, unnest($w::DOUBLE[]) AS w),
         wanted AS (SELECT unnest($vids::VARCHAR[]) AS variant_id, unnest(range($nv)) AS v)
    SELECT wanted.v, c.class_id::INTEGER AS class_id, sum(drawn.w * c.tp) AS tp,
           sum(drawn.w * c.fp) AS fp, sum(drawn.w * c.fn) AS fn,
           coalesce(sum(drawn.w) FILTER (WHERE c.tp + c.fn > 0), 0) AS held
    FROM counts c JOIN drawn USING (image_id) JOIN wanted USING (variant_id)
    GROUP BY ALL"""


@dataclass(frozen=True)
class Case:
    """One cache to time: its split's candidates and the targets (seconds) of the three steps."""

    title: str
    cache_dir: Path
    dataset_id: str
    variant_ids: list[str]
    target_s: float  # bootstrap and cross-validation
    budget_target_s: float


# --- the synthetic cache ---------------------------------------------------------------------


def synth(n_images: int, n_variants: int, seed: int = 0) -> dict[str, pa.Table]:
    """Rows of a synthetic VOC split: images (img int64, height/width int32, labels list<uint8>)
    and counts (v int8, img int64, class_id uint8, tp/fp/fn int64; only rows with tp + fp + fn > 0)."""
    rng = np.random.default_rng(seed)
    n_obj_classes = VOC.num_classes - 1
    n_objects = np.minimum(1 + rng.poisson(0.5, n_images), 5)
    weights = 1.0 / (1 + rng.permutation(n_obj_classes)) ** 0.8
    ranked = np.argsort(-(np.log(weights) + rng.gumbel(size=(n_images, n_obj_classes))), axis=1)  # Gumbel top-k
    obj_img = np.repeat(np.arange(n_images), n_objects)
    obj_cls = np.sort(np.where(np.arange(n_obj_classes) < n_objects[:, None], ranked, n_obj_classes), axis=1)
    obj_cls = obj_cls[obj_cls < n_obj_classes] + 1  # image by image, classes ascending, like obj_img
    height = rng.choice(np.array([333, 375, 400, 500], np.int32), n_images)
    width = np.full(n_images, 500, np.int32)
    valid = (height * width * rng.uniform(0.9, 0.99, n_images)).astype(np.int64)  # GT 255 left out
    share = rng.exponential(size=obj_img.size)
    share /= np.bincount(obj_img, share, n_images)[obj_img]
    area = np.maximum(1, (valid[obj_img] * rng.beta(2.0, 2.5, n_images)[obj_img] * share).astype(np.int64))
    g0 = np.maximum(0, valid - np.bincount(obj_img, area, n_images).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(n_objects)]).astype(np.int32)
    images = pa.table({"img": np.arange(n_images), "height": height, "width": width,
                       "labels": pa.ListArray.from_arrays(offsets, pa.array(obj_cls.astype(np.uint8)))})
    parts = []
    for v in range(n_variants):
        skill = np.clip(0.35 + 0.4 * v / max(1, n_variants - 1) + 0.12 * rng.standard_normal(VOC.num_classes),
                        0.05, 0.95)[obj_cls]
        parts.append(variant_counts(rng, v, skill, VOC.num_classes, valid, g0, obj_img, obj_cls, area))
    return {"images": images, "counts": pa.concat_tables(parts)}


def build(cache_dir: Path, n_images: int, n_variants: int) -> list[str]:
    """The synthetic cache in ``cache_dir`` (dataset, images with masks, variants, label maps,
    counts and their totals); returns the variant ids."""
    rows = synth(n_images, n_variants)
    variants = [Variant(id=f"synthetic-{v:02d}", dataset_id=SYNTH_ID, name=f"candidate {v}", method="cam",
                        step="cam", params={"seed": v}, steps=({"name": "cam", "params": {"seed": v}},),
                        source_id=None, code_version="bench", created_at=1.0 + v) for v in range(n_variants)]
    vids = [v.id for v in variants]
    with connect(cache_dir) as con:
        con.execute("SET enable_progress_bar = false")
        con.register("synth_images", rows["images"])
        con.register("synth_counts", rows["counts"])
        queries.upsert_dataset(con, SYNTH_ID, "VOC 2012 (synthetic)", SYNTH_ROOT, VOC, "vocdevkit")
        for v in variants:
            queries.insert_variant(con, v)
        con.execute(f"""INSERT INTO images SELECT $ds, $split, {IMAGE_ID},
                               $root || '/JPEGImages/' || {IMAGE_ID} || '.jpg',
                               $root || '/SegmentationClassAug/' || {IMAGE_ID} || '.png', height, width,
                               labels::UTINYINT[], NULL
                        FROM synth_images ORDER BY img""", {"ds": SYNTH_ID, "split": SPLIT, "root": SYNTH_ROOT})
        con.execute(f"""INSERT INTO label_maps
                        SELECT v.id, {IMAGE_ID}, 'labels/' || v.id || '/' || {IMAGE_ID} || '.png', NULL, 2.0
                        FROM (SELECT unnest($vids::VARCHAR[]) AS id) v, range($n) t(img)""",
                    {"vids": vids, "n": n_images})
        con.execute(f"""INSERT INTO counts
                        SELECT list_extract($vids::VARCHAR[], v + 1), {IMAGE_ID}, class_id, tp, fp, fn
                        FROM synth_counts""", {"vids": vids})
        queries.rebuild_split_totals(con, SYNTH_ID, SPLIT)
    return vids


def real_case(cache_dir: Path, root: Path) -> Case | str:
    """Case A, or why it is skipped."""
    if not db_path(cache_dir).exists():
        return f"no cache at {cache_dir}"
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        if queries.get_dataset(con, dataset_id) is None:
            return f"{root} is not registered in {cache_dir}"
        vids = [c.variant.id for c in assignments.complete_variants(con, dataset_id, SPLIT) if c.default]
    if not vids:
        return f"no default candidate labels every usable {SPLIT} image of {root}"
    return Case(f"A: {root.name} {SPLIT}, real cache {cache_dir}", cache_dir, dataset_id, vids, 2.0, 10.0)


# --- timing ----------------------------------------------------------------------------------


def best(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """The best wall-clock seconds of ``repeats`` calls and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def loop_iou(con: queries.Con, image_ids: Sequence[str], weights: np.ndarray, variant_ids: Sequence[str],
             num_classes: int) -> np.ndarray:
    """The plain loop's ``(V, C)`` per-class IoU of one resample: image n counted ``weights[n]``
    times, one weighted aggregation of the counts rows (NaN where no drawn image holds the class)."""
    drawn = np.flatnonzero(weights)
    rows = con.execute(LOOP_SQL, {"ids": [image_ids[i] for i in drawn], "w": weights[drawn].tolist(),
                                  "vids": list(variant_ids), "nv": len(variant_ids)}).fetchnumpy()
    sums, held = np.zeros((len(variant_ids), num_classes, 3)), np.zeros((len(variant_ids), num_classes))
    at = (rows["v"].astype(np.int64), rows["class_id"].astype(np.int64))
    sums[at] = np.stack([rows["tp"], rows["fp"], rows["fn"]], axis=1)
    held[at] = rows["held"]
    return np.where(held > 0, sums[..., 0] / np.maximum(sums.sum(axis=-1), 1), np.nan)


def loop_seconds(con: queries.Con, image_ids: Sequence[str], weights: np.ndarray, variant_ids: Sequence[str],
                 num_classes: int) -> tuple[float, list[np.ndarray]]:
    """Best seconds per resample of the plain loop over the rows of ``weights (R, N)``, and the IoUs."""
    times, ious = [], []
    for w in weights:
        start = time.perf_counter()
        ious.append(loop_iou(con, image_ids, w, variant_ids, num_classes))
        times.append(time.perf_counter() - start)
    return min(times), ious


def measure(case: Case, resamples: int, loop: int, repeats: int) -> None:
    """Time every step of ``case`` and its plain-loop baseline; print the table."""
    with connect(case.cache_dir, read_only=True) as con:
        con.execute("SET enable_progress_bar = false")
        vids = case.variant_ids
        load_s, data = best(lambda: reports.image_counts(con, case.dataset_id, SPLIT, vids), repeats)
        counts, classes, ids, n = data.counts, data.classes, data.image_ids, len(data.image_ids)
        plan = assignments.build_plan(con, case.dataset_id, SPLIT, vids)
        half = assignments.build_plan(con, case.dataset_id, SPLIT, vids, Subset(0.5, seed=0))
        weights = validation.bootstrap_weights(n, resamples, 0)

        def bootstrap() -> np.ndarray:
            iou = validation.resampled_iou(counts, validation.bootstrap_weights(n, resamples, 0))
            validation.confidence(iou, plan.choice, classes)
            return iou

        boot_s, iou = best(bootstrap, repeats)
        folds_s, fold = best(lambda: validation.folds(ids, K, 0), repeats)
        rules = {"Algorithm 2": AssignRule(), "stable": AssignRule("stable", resamples=resamples)}
        cv_s = {name: best(lambda: validation.cross_validate(counts, fold, rule.rule(vids, classes), vids, classes),
                           repeats)[0] for name, rule in rules.items()}
        validate_s, _ = best(lambda: assignments.validate(con, plan, K, 0, resamples), 1)
        budget_s, curve = best(lambda: assignments.budget_curve(con, half, validation.BUDGET_SIZES, DRAWS, 0,
                                                                resamples=resamples), 1)

        # The plain loop: the full split on the bootstrap's own first resamples (checked equal), and
        # at each other size on `loop` resamples of that many images.
        per_table = {}
        per_table[n], loop_ious = loop_seconds(con, ids, weights[:loop], vids, classes.num_classes)
        same = bool(np.allclose(np.array(loop_ious), iou[:loop], equal_nan=True))
        assert same, "the plain loop's IoU differs from resampled_iou's"
        pool, report = len(half.selection_ids), len(half.report_ids)
        rng = np.random.default_rng(1)
        train = n - n // K
        for m in {train, report, *(r.n for r in curve)} - {n}:
            picked = np.zeros((loop, n))
            picked[:, rng.choice(n, m, replace=False)] = validation.bootstrap_weights(m, loop, 1)
            per_table[m] = loop_seconds(con, ids, picked, vids, classes.num_classes)[0]

    baseline_boot = resamples * per_table[n]
    baseline_cv = K * (resamples + 2) * per_table[train]
    baseline_budget = per_table[report] + sum((DRAWS if r.n < pool else 1) * (resamples + 1) * per_table[r.n]
                                              for r in curve)
    print(f"\nCase {case.title}")
    print(f"  {n:,} images with ground truth x {len(vids)} candidates x {classes.num_classes} classes "
          f"(counts {counts.nbytes / 2 ** 20:.0f} MiB), B = {resamples} resamples, k = {K}; budget curve: "
          f"pool {pool:,}, report {report:,}, sizes {[r.n for r in curve]} x {DRAWS} draws")
    print(f"  plain loop, time per IoU table (best of {loop} resamples): "
          + ", ".join(f"{m:,} images {s * 1000:.1f} ms" for m, s in sorted(per_table.items(), reverse=True)))
    print(f"  check: the loop's IoU of resamples 0..{loop - 1} equals resampled_iou's (np.allclose): {same}")
    rows = [
        ("load: reports.image_counts (one query)", load_s, None, None),
        ("bootstrap: weights + resampled_iou + confidence", boot_s, case.target_s, baseline_boot),
        ("cross-validation: folds + Algorithm 2 + stable", folds_s + sum(cv_s.values()), case.target_s, baseline_cv),
        ("  of which folds (SHA-1 per image)", folds_s, None, None),
        *((f"  of which {name}", s, None, None) for name, s in cv_s.items()),
        ("assignments.validate (load + bootstrap + both CVs)", validate_s, None, baseline_boot + baseline_cv),
        (f"budget curve: {len(curve)} sizes x {DRAWS} draws", budget_s, case.budget_target_s, baseline_budget),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"  {'step':<{width}}  {'measured':>9}  {'target':>8}  verdict  {'plain loop':>10}  loop / new")
    for name, s, target, base in rows:
        verdict = "" if target is None else "PASS" if s < target else "FAIL"
        print(f"  {name:<{width}}  {s:8.3f}s  {'' if target is None else f'< {target:.0f} s':>8}  {verdict:<7}  "
              f"{'' if base is None else f'{base:9.1f}s':>10}  {'' if base is None else f'{base / s:9.0f}x'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="case A's cache folder")
    parser.add_argument("--root", type=Path, default=default_voc_root(), help="case A's dataset root")
    parser.add_argument("--images", type=int, default=10_000, help="case B's images")
    parser.add_argument("--variants", type=int, default=12, help="case B's candidates")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples B")
    parser.add_argument("--loop", type=int, default=10, help="resamples the plain loop times per size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the cheap steps; the best is printed")
    parser.add_argument("--keep", action="store_true", help="keep case B's scratch cache and print its path")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"{os.cpu_count()} CPU cores; wall-clock seconds on whatever else the machine runs")
    case = real_case(args.cache.resolve(), args.root.resolve())
    if isinstance(case, str):
        print(f"\nCase A skipped: {case}")
    else:
        measure(case, args.resamples, args.loop, args.repeats)
    scratch = Path(tempfile.mkdtemp(prefix="honest_isle_"))
    try:
        built = time.perf_counter()
        vids = build(scratch, args.images, args.variants)
        print(f"\nbuilt case B's cache in {time.perf_counter() - built:.1f} s "
              f"({db_path(scratch).stat().st_size / 2 ** 20:.0f} MiB)")
        measure(Case(f"B: synthetic, {args.images:,} images x {args.variants} candidates", scratch, SYNTH_ID, vids,
                     10.0, 10.0), args.resamples, args.loop, args.repeats)
    finally:
        if args.keep:
            print(f"case B's scratch cache kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total_s = time.perf_counter() - start
    print(f"\npeak RSS {peak_mib:.0f} MiB (getrusage, build included); bench total {total_s:.0f} s")


if __name__ == "__main__":
    main()
