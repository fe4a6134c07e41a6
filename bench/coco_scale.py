"""Benchmark: the app's count queries on a COCO-train-sized cache vs a 10,000-image one, same run.

    python -m bench.coco_scale [--images 82783 10000] [--variants 12] [--repeats 5] [--keep]

Builds a scratch cache per size (a temporary folder, deleted at the end unless ``--keep``): one
dataset of 81 classes (background 0 + 80, the names of ``coco2014-mini/classes.txt`` when
present), one split "train" of ``--images`` images and ``--variants`` variants that labelled every
image. No image or label map exists on disk; only the rows do, drawn with a fixed seed:

- **images**: 1 + Poisson(1.9) object classes each (at most 12, ~2.9 on average as in COCO),
  drawn without replacement with weights 1 / rank^1.1 (class 1 in about 40 % of the images,
  class 80 in about 0.5 %); 0.2 % of the images carry a ``problem`` (left out of every figure).
- **counts**: per variant and image, rows for background and each object class (recall drawn
  around the variant's quality, 5 % of objects missed), plus with probability 0.15 a false-positive
  row of a class the image does not hold: about 4 rows per image and variant (COCO: 3.9 M rows
  for 12 variants). Background absorbs the objects' FP as FN and their FN as FP.

Rows go in through DuckDB from Arrow (no per-image Python), then ``queries.rebuild_split_totals``
builds the split's totals (what a re-scan or the schema-6 upgrade costs). The app-side reads run
in a fresh process per size, each as the app runs it (``ui.common.read``: open a read-only
connection, call, close), median of ``--repeats``:

- the heatmap: ``reports.iou_table`` on the whole split (count totals), today's per-image
  aggregation (``queries.class_counts_from_rows``) for reference, and the subset case (50 %);
- a QA page: ``qa.find_images`` sorted by per-image IoU of class 1 (the most frequent), 24 rows;
- the ISLE prediction: ``engine.isle.assignments.build_plan`` over every variant, with every
  image selecting and with half, and the count reads it makes one by one (where its time goes).

Then the cache's size on disk and the reading process's peak RSS (``resource.getrusage``), and in
the building process the write side: ``queries.record_results`` re-recording 2,000 images of one
variant (one worker flush, with its totals delta), after which totals must still equal the
per-image aggregation. Each target (< 300 ms at the largest size, cost growing at most linearly
from the smallest) is printed PASS/FAIL.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cache import qa, queries, reports
from cache.classes import ClassSet, read_classes_txt
from cache.db import connect, db_path
from cache.rows import Variant

REPO = Path(__file__).resolve().parents[1]
CLASSES_TXT = REPO.parent / "shared" / "data" / "coco2014-mini" / "classes.txt"
DATASET_ID, SPLIT, ROOT = "coco-synthetic", "train", "/synthetic/coco2014"
N_OBJECT = 80
TARGET_MS = 300.0
RECORD_BATCH = 2_000  # images per record_results call, as in bench/qa_browse.py
CHAIN = (("cam", "CAM"), ("dcrf", "dCRF"), ("random-walk", "random walk"), ("svm", "SVM (seed)"))


def class_set() -> ClassSet:
    """COCO's 80 classes after background when ``classes.txt`` is there, else class_1..class_80."""
    if CLASSES_TXT.exists():
        classes = read_classes_txt(CLASSES_TXT)
        if classes.num_classes == N_OBJECT + 1:
            return classes
    return ClassSet(("background", *(f"class_{c}" for c in range(1, N_OBJECT + 1))))


def synth(n_images: int, n_variants: int, seed: int = 0) -> dict[str, pa.Table]:
    """The rows of a synthetic split as Arrow tables with integer image numbers.

    images: img int64, height/width int32, labels list<uint8> (sorted), problem bool.
    counts: v int8 (variant number), img int64, class_id uint8, tp/fp/fn int64, ordered by
    variant, image, class (the order a worker records them in); only rows with tp + fp + fn > 0.
    """
    rng = np.random.default_rng(seed)
    n_objects = np.minimum(1 + rng.poisson(1.9, n_images), 12)
    weights = 1.0 / np.arange(1, N_OBJECT + 1) ** 1.1
    # Gumbel top-k: the first k of each row are k classes drawn without replacement by weight.
    keys = np.log(weights) + rng.gumbel(size=(n_images, N_OBJECT))
    ranked = np.argsort(-keys, axis=1)
    chosen = np.arange(N_OBJECT)[None, :] < n_objects[:, None]
    obj_img = np.repeat(np.arange(n_images), n_objects)
    obj_cls = ranked[chosen] + 1  # row-major: image by image, like obj_img
    order = np.lexsort((obj_cls, obj_img))
    obj_img, obj_cls = obj_img[order], obj_cls[order]
    height = rng.choice(np.array([375, 427, 480, 500, 512, 640], np.int32), n_images)
    width = np.full(n_images, 640, np.int32)
    valid = (height * width * rng.uniform(0.95, 0.99, n_images)).astype(np.int64)  # GT 255 left out
    share = rng.exponential(size=obj_img.size)
    share /= np.bincount(obj_img, share, n_images)[obj_img]
    objects_fraction = rng.beta(2.0, 2.5, n_images)
    area = np.maximum(1, (valid[obj_img] * objects_fraction[obj_img] * share).astype(np.int64))
    g0 = np.maximum(0, valid - np.bincount(obj_img, area, n_images).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(n_objects)]).astype(np.int32)
    images = pa.table({
        "img": np.arange(n_images), "height": height, "width": width,
        "labels": pa.ListArray.from_arrays(offsets, pa.array(obj_cls.astype(np.uint8))),
        "problem": rng.random(n_images) < 0.002,
    })
    parts = [variant_counts(rng, v, 0.35 + 0.4 * v / max(1, n_variants - 1), N_OBJECT + 1, valid, g0, obj_img,
                            obj_cls, area) for v in range(n_variants)]
    return {"images": images, "counts": pa.concat_tables(parts)}


def variant_counts(rng: np.random.Generator, v: int, quality: float | np.ndarray, n_classes: int, valid: np.ndarray,
                   g0: np.ndarray, obj_img: np.ndarray, obj_cls: np.ndarray, area: np.ndarray) -> pa.Table:
    """Variant ``v``'s sparse count rows (v, img, class_id, tp, fp, fn; rows with a pixel only), in
    image then class order. quality: a scalar or one per object (obj_img, obj_cls, area: each
    image's objects and their ground-truth pixels); recall ~ Beta around it, 5 % of objects missed,
    false positives on held classes and, in 15 % of the images, on one class the image does not
    hold; the background row (ground truth g0 of the valid pixels) absorbs both."""
    n_images = valid.size
    recall = rng.beta(8 * quality, 8 * (1 - quality), obj_img.size) * (rng.random(obj_img.size) >= 0.05)
    tp = (area * recall).astype(np.int64)
    fn = area - tp
    fp = (area * rng.uniform(0, 1.2, obj_img.size) * (1 - quality)).astype(np.int64)
    ex_img = np.flatnonzero(rng.random(n_images) < 0.15)  # a false-positive class the image does not hold
    ex_cls = rng.integers(1, n_classes, ex_img.size)
    held = np.zeros((n_images, n_classes), bool)
    held[obj_img, obj_cls] = True
    keep = ~held[ex_img, ex_cls]
    ex_img, ex_cls = ex_img[keep], ex_cls[keep]
    ex_fp = (valid[ex_img] * rng.uniform(0.005, 0.05, ex_img.size)).astype(np.int64)
    fn0 = np.minimum(g0, np.bincount(obj_img, fp, n_images).astype(np.int64)
                     + np.bincount(ex_img, ex_fp, n_images).astype(np.int64))
    fp0 = np.bincount(obj_img, fn, n_images).astype(np.int64)
    img = np.concatenate([np.arange(n_images), obj_img, ex_img])
    cls = np.concatenate([np.zeros(n_images, np.int64), obj_cls, ex_cls])
    c_tp = np.concatenate([g0 - fn0, tp, np.zeros(ex_img.size, np.int64)])
    c_fp = np.concatenate([fp0, fp, ex_fp])
    c_fn = np.concatenate([fn0, fn, np.zeros(ex_img.size, np.int64)])
    order = np.lexsort((cls, img))
    order = order[(c_tp + c_fp + c_fn)[order] > 0]
    return pa.table({"v": np.full(order.size, v, np.int8), "img": img[order], "class_id": cls[order].astype(np.uint8),
                     "tp": c_tp[order], "fp": c_fp[order], "fn": c_fn[order]})


def variant_rows(n_variants: int) -> list[Variant]:
    """Methods and refinement chains: every fourth variant a method, the next ones refine it."""
    rows = []
    for v in range(n_variants):
        name, title = CHAIN[v % len(CHAIN)]
        source = None if v % len(CHAIN) == 0 else rows[-1]
        chain = (source.name + " → " if source else "") + title
        steps = (*(source.steps if source else ()), {"name": name, "params": {"seed": v}})
        rows.append(Variant(id=f"{v:02d}{'%014x' % (v * 7919 + 1)}", dataset_id=DATASET_ID, name=f"{chain} #{v}",
                            method=steps[0]["name"], step=name, params={"seed": v}, steps=steps,
                            source_id=source.id if source else None, code_version="bench", created_at=1.0 + v))
    return rows


IMAGE_ID = "'COCO_train2014_' || lpad(img::VARCHAR, 12, '0')"


def build(cache_dir: Path, n_images: int, n_variants: int) -> dict[str, Any]:
    """The synthetic cache of ``n_images`` images in ``cache_dir``: seconds per stage and rows."""
    start = time.perf_counter()
    rows = synth(n_images, n_variants)
    synth_s = time.perf_counter() - start
    variants = variant_rows(n_variants)
    vids = [v.id for v in variants]
    start = time.perf_counter()
    with connect(cache_dir) as con:
        con.execute("SET enable_progress_bar = false")
        con.register("synth_images", rows["images"])
        con.register("synth_counts", rows["counts"])
        queries.upsert_dataset(con, DATASET_ID, "COCO 2014 (synthetic)", ROOT, class_set(), "coco2014")
        for v in variants:
            queries.insert_variant(con, v)
        mask = f"$root || '/masks/' || {IMAGE_ID} || '.png'"
        con.execute(f"""INSERT INTO images SELECT $ds, $split, {IMAGE_ID},
                               $root || '/train2014/' || {IMAGE_ID} || '.jpg', {mask}, height, width,
                               labels::UTINYINT[], CASE WHEN problem THEN {mask} || ': unreadable' END
                        FROM synth_images ORDER BY img""", {"ds": DATASET_ID, "split": SPLIT, "root": ROOT})
        # Label maps variant by variant, in image order: the order the worker records them in.
        con.execute(f"""INSERT INTO label_maps
                        SELECT v.id, {IMAGE_ID}, 'labels/' || v.id || '/' || {IMAGE_ID} || '.png', NULL, 2.0
                        FROM (SELECT unnest($vids::VARCHAR[]) AS id, generate_subscripts($vids::VARCHAR[], 1) AS k) v,
                             range($n) t(img)
                        ORDER BY v.k, img""", {"vids": vids, "n": n_images})
        con.execute(f"""INSERT INTO counts SELECT list_extract($vids::VARCHAR[], v + 1), {IMAGE_ID}, class_id,
                               tp, fp, fn FROM synth_counts""", {"vids": vids})
    insert_s = time.perf_counter() - start
    start = time.perf_counter()
    with connect(cache_dir) as con:
        queries.rebuild_split_totals(con, DATASET_ID, SPLIT)
    totals_s = time.perf_counter() - start
    with connect(cache_dir) as con:
        con.execute("CHECKPOINT")
        n_counts = con.execute("SELECT count(*) FROM counts").fetchone()[0]
        n_totals = con.execute("SELECT count(*) FROM count_totals").fetchone()[0]
    return {"synth_s": synth_s, "insert_s": insert_s, "totals_s": totals_s, "count_rows": n_counts,
            "total_rows": n_totals, "variants": vids, "db_mib": db_path(cache_dir).stat().st_size / 2 ** 20}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs``, 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak RSS since the last reset (``VmHWM``), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def app_reads(cache_dir: Path, repeats: int) -> dict[str, Any]:
    """The app-side reads of one cache, each as ``ui.common.read`` runs it; run in a fresh
    process (``measure``) so the peak RSS is the reads', not the build's."""
    from engine.isle import assignments
    from engine.isle.numerics import Subset

    imported_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Python, engine imports, DuckDB
    reset = _reset_peak_rss()
    with connect(cache_dir, read_only=True) as con:  # the process's first reader opens a writer once
        variant_ids = [v.id for v in queries.variants(con, DATASET_ID)]
        usable = queries.usable_image_ids(con, DATASET_ID, SPLIT)
    half = Subset(0.5, seed=0).split(usable)[0]

    def read(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        def call() -> Any:
            with connect(cache_dir, read_only=True) as con:
                return fn(con, *args)
        return call

    out: dict[str, Any] = {"half": len(half), "usable": len(usable)}
    out["same_rows"] = read(queries.class_counts, DATASET_ID, SPLIT)() == read(
        queries.class_counts_from_rows, DATASET_ID, SPLIT)()
    timed = {
        "open + close a read-only connection": read(lambda con: None),
        "heatmap: class_counts, whole split (totals)": read(queries.class_counts, DATASET_ID, SPLIT),
        "heatmap: class_counts_from_rows, whole split (per-image rows)": read(
            queries.class_counts_from_rows, DATASET_ID, SPLIT),
        "heatmap: iou_table, whole split": read(reports.iou_table, DATASET_ID, SPLIT),
        "  of which labelled_in_split (x2 in iou_table)": read(queries.labelled_in_split, DATASET_ID, SPLIT),
        "  of which variants": read(queries.variants, DATASET_ID),
        "subset: class_counts, 50 %": read(queries.class_counts, DATASET_ID, SPLIT, half),
        "subset: iou_table, 50 %": read(reports.iou_table, DATASET_ID, SPLIT, half),
        "QA: find_images, per-image IoU of class 1, page 1": read(
            qa.find_images, DATASET_ID, qa.ImageQuery(SPLIT, variant=variant_ids[0], class_id=1, sort="iou")),
    }
    for fraction in (1.0, 0.5):
        timed[f"ISLE: build_plan, {len(variant_ids)} candidates, fraction {fraction}"] = read(
            assignments.build_plan, DATASET_ID, SPLIT, variant_ids, Subset(fraction))
    timed.update({  # what build_plan reads, one by one (the iou_tables are the heatmap's and subset's above)
        "  of which usable_image_ids": read(queries.usable_image_ids, DATASET_ID, SPLIT),
        "  of which Subset(1.0).split (SHA-1 per image)": lambda: Subset(1.0).split(usable),
        "  of which Subset(0.5).split (SHA-1 per image)": lambda: Subset(0.5).split(usable),
        "  (usable_images, which build_plan read before)": read(queries.usable_images, DATASET_ID, SPLIT),
    })
    times, errors = {}, {}
    for name, fn in timed.items():
        try:
            times[name] = median_ms(fn, repeats)
        except Exception as exc:  # e.g. the ISLE numerics not yet sized by the class set
            errors[name] = f"{type(exc).__name__}: {exc}"
    out.update(times=times, errors=errors, imported_rss_mib=imported_rss_mib,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               reads_peak_rss_mib=_peak_rss_mib() if reset else None)
    return out


def rerecord(cache_dir: Path, variant_id: str) -> dict[str, Any]:
    """One worker flush re-recording ``RECORD_BATCH`` images of a variant (new counts: every
    row's tp moved to fn), then whether the totals still equal the per-image aggregation."""
    with connect(cache_dir) as con:
        rows = con.execute(
            """SELECT image_id, class_id, tp, fp, fn FROM counts WHERE variant_id = ? AND image_id IN
                      (SELECT DISTINCT image_id FROM counts WHERE variant_id = ? ORDER BY image_id LIMIT ?)""",
            [variant_id, variant_id, RECORD_BATCH]).fetchall()
    ids = sorted({r[0] for r in rows})
    batch = queries.ResultRows([(i, f"labels/{variant_id}/{i}.png", None) for i in ids],
                               [(i, c, 0, fp, tp + fn) for i, c, tp, fp, fn in rows], [])
    start = time.perf_counter()
    with connect(cache_dir) as con:
        queries.record_results(con, 1, variant_id, batch)
    seconds = time.perf_counter() - start
    with connect(cache_dir, read_only=True) as con:
        same = queries.class_counts(con, DATASET_ID, SPLIT) == queries.class_counts_from_rows(con, DATASET_ID, SPLIT)
    return {"record_ms": seconds * 1000, "images": len(ids), "rows": len(rows), "same_rows": same}


def measure(cache_dir: Path, repeats: int) -> dict[str, Any]:
    """``app_reads`` in a spawned process (fresh interpreter, fresh DuckDB)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(app_reads, (cache_dir, repeats))


def run(sizes: list[int], n_variants: int, repeats: int, keep: bool) -> dict[int, dict[str, Any]]:
    results = {}
    for n in sizes:
        cache_dir = Path(tempfile.mkdtemp(prefix=f"coco_scale_{n}_"))
        try:
            built = build(cache_dir, n, n_variants)
            reads = measure(cache_dir, repeats)
            written = rerecord(cache_dir, built["variants"][-1])
            results[n] = {**built, **reads, "write": written}
        finally:
            if keep:
                print(f"scratch cache of {n:,} images kept at {cache_dir}")
            else:
                shutil.rmtree(cache_dir, ignore_errors=True)
    return results


def report(results: dict[int, dict[str, Any]], n_variants: int, repeats: int) -> None:
    big, small = max(results), min(results)
    linear = big / small
    print(f"{n_variants} variants, 81 classes; {multiprocessing.cpu_count()} CPU cores; median of {repeats}; "
          f"each read opens and closes a read-only connection, as the app does")
    for n, r in sorted(results.items()):
        during = "?" if r["reads_peak_rss_mib"] is None else f"{r['reads_peak_rss_mib']:.0f}"
        print(f"{n:>7,} images ({r['usable']:,} usable): {r['count_rows']:,} count rows, "
              f"{r['total_rows']:,} total rows, "
              f"DB {r['db_mib']:.0f} MiB | synth {r['synth_s']:.1f} s, insert {r['insert_s']:.1f} s, "
              f"rebuild totals of the split {r['totals_s'] * 1000:.0f} ms")
        print(f"{n:>7,} images: reader peak RSS (getrusage) {r['peak_rss_mib']:.0f} MiB, of which imports "
              f"{r['imported_rss_mib']:.0f} MiB; peak RSS during the reads alone (VmHWM after a reset) {during} MiB")
    for n, r in sorted(results.items()):
        w = r["write"]
        print(f"{n:>7,} images: record_results re-recording {w['images']:,} images ({w['rows']:,} rows) of one "
              f"variant {w['record_ms']:.0f} ms; totals = per-image aggregation: before {r['same_rows']}, "
              f"after {w['same_rows']}")
    names = list(dict.fromkeys(k for r in results.values() for k in (*r["times"], *r["errors"])))
    width = max(map(len, names))
    print(f"\n{'read':<{width}}  {f'{big:,}':>9}  {f'{small:,}':>9}  {'ratio':>6}  "
          f"target (< {TARGET_MS:.0f} ms, ratio <= {linear:.1f})")
    for name in names:
        b, s = results[big]["times"].get(name), results[small]["times"].get(name)
        if b is None or s is None:
            error = results[big]["errors"].get(name) or results[small]["errors"].get(name)
            print(f"{name:<{width}}  {'-':>9}  {'-':>9}  {'-':>6}  FAIL: {error}")
            continue
        verdict = "" if name.startswith(("  ", "open")) or "from_rows" in name else (
            "PASS" if b < TARGET_MS and b / s <= linear else "FAIL")
        print(f"{name:<{width}}  {b:9.1f}  {s:9.1f}  {b / s:6.2f}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs=2, default=[82_783, 10_000], help="the two split sizes")
    parser.add_argument("--variants", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5, help="runs per read; the median is printed")
    parser.add_argument("--keep", action="store_true", help="keep the scratch caches and print their paths")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(args.images, args.variants, args.repeats, args.keep)
    report(results, args.variants, args.repeats)
    print(f"\nbench total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
