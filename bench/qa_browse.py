"""Benchmark: the pseudo-label QA page's interactions on a 10,000-image split vs decoding label maps, same run.

    python -m bench.qa_browse [--root DIR] [--images 10000] [--repeats 5] [--baseline-images 300]
                              [--json PATH] [--keep]

Builds a scratch cache (a temporary folder, deleted at the end unless ``--keep``) whose split
holds ``--images`` images: the real VOC images of ``--root`` (every split list, 2,120 for the
bundled animals subset) repeated, ``<id>`` for the first copy and ``<id>~<k>`` after, each row
pointing to the real JPEG and mask. Three variants label every image, made once per real image
from its ground truth (GT 255 pixels stay 255) and shared by its copies:

- **shifted**: the mask rolled right by 5 % of its width;
- **blocky**: the mask taken every 8th pixel and blown up again (nearest neighbour);
- **merge**: blocky's label maps and counts, plus ``conflicts`` rows where the two disagree
  between two foreground classes (winner blocky's class, loser shifted's).

Counts come from ``engine.ops.metrics.confusion_counts`` and are recorded with
``queries.record_results`` (2,000 images per call); ~300 flags of mixed kinds are set with
``qa.set_flag``. Then, each the median of ``--repeats`` runs (``time.perf_counter``):

- **page queries**: ``qa.find_images`` (24 images) for every key of ``qa.SORTS`` without and with
  a class (dog), and the class, flagged, unflagged and flag-kind filters, at the first page and
  at a deep page (offset = half the matching images); with variant "shifted" chosen, as the page
  always has one to draw. Then ``qa.flags`` and ``qa.flagged_ids``, and the single-image view's
  reads (``image_row``, ``image_label_maps``, ``flags``). Each opens its own read-only
  connection (``cache.db.connect``), as the app does, and that is included (timed alone too).
- **page files**: for the 24 images of the first "errors" page, ``image_thumbnail`` +
  ``label_thumbnail`` (shifted) + ``overlay``: cold (thumbs folder emptied before each run) and
  warm. Copies share files, so that page holds fewer distinct files than images (printed); a
  cold run over 24 distinct real images is timed too. Then the single-image view at full size:
  JPEG, mask and two label maps decoded, both overlaid.
- **the page**: ``app_pages/qa.py`` run by Streamlit's AppTest on the scratch cache as a user clicks
  through it (first load, sort by a variant's error pixels of a class, next page, open an image,
  back), each step once on an emptied thumbnail folder.
- **baseline**: what ranking the split costs without the cached counts: decode the mask and the
  shifted label map and take the dog IoU, per image, timed on ``--baseline-images`` distinct
  images and extrapolated linearly to the split (a lower bound for "disagreement" and "gain",
  which would decode two label maps). Printed once, and for every query with a sort key other
  than "image" as the ratio baseline / query: how many times faster the page ranks the split
  than decoding would. The OS file cache is warm for both.

Prints one line per interaction (ms per interaction, images matched, the ratio), the build time
and the DB size. Times are wall-clock on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache import qa, queries
from cache.db import connect, db_path
from cache.labelmaps import read_label_map, write_label_map
from cache.rows import Variant
from cache.schema import JobStatus
from cache.thumbnails import image_thumbnail, label_thumbnail
from cache.classes import IGNORE_INDEX, VOC
from engine import __version__
from engine.core.dataset import default_voc_root, image_labels, open_layout, read_image, read_mask
from engine.core.layouts import read_split_ids
from engine.ops.metrics import confusion_counts, iou_from_counts
from ui.overlays import overlay

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = "bench-qa-browse"
SPLIT = "qa"
VARIANTS = {"shifted": "bench-shifted", "blocky": "bench-blocky", "merge": "bench-merge"}  # name -> variant id
CLASS_ID = VOC.index("dog")  # 12: in about a third of the animals subset's images
PAGE = 24  # images per grid page of the QA page
BATCH = 2_000  # images per record_results call: one INSERT per table each
N_FLAGS = 300


@dataclass(frozen=True)
class RealImage:
    """One real image and what its copies share: counts per variant name, ``(class_id, tp, fp,
    fn)`` rows with tp + fp + fn > 0; merge conflicts as ``(winner, loser, pixels)``."""

    image_id: str
    image_path: Path
    mask_path: Path
    height: int
    width: int
    labels: tuple[int, ...]
    counts: dict[str, list[tuple[int, int, int, int]]]
    conflicts: list[tuple[int, int, int]]


def shifted(mask: np.ndarray) -> np.ndarray:
    """``(H, W) uint8`` mask rolled right by 5 % of its width, GT 255 pixels kept in place."""
    rolled = np.roll(mask, max(1, round(0.05 * mask.shape[1])), axis=1)
    return np.where(mask == IGNORE_INDEX, IGNORE_INDEX, rolled).astype(np.uint8)


def blocky(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """``(H, W) uint8`` mask downsampled ``factor`` times (nearest) and upsampled back, GT 255 kept."""
    h, w = mask.shape
    coarse = np.repeat(np.repeat(mask[::factor, ::factor], factor, axis=0), factor, axis=1)[:h, :w]
    return np.where(mask == IGNORE_INDEX, IGNORE_INDEX, coarse).astype(np.uint8)


def conflict_rows(loser: np.ndarray, winner: np.ndarray) -> list[tuple[int, int, int]]:
    """``(winner, loser, pixels)`` where the two ``(H, W) uint8`` maps hold different foreground classes."""
    fg = (loser != winner) & (loser >= 1) & (loser < VOC.num_classes) & (winner >= 1) & (winner < VOC.num_classes)
    pairs = np.bincount(winner[fg].astype(np.intp) * VOC.num_classes + loser[fg], minlength=VOC.num_classes ** 2)
    return [(int(k // VOC.num_classes), int(k % VOC.num_classes), int(pairs[k])) for k in np.flatnonzero(pairs)]


def count_rows(gt: np.ndarray, label: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [(c, int(tp), int(fp), int(fn)) for c, (tp, fp, fn) in enumerate(confusion_counts(gt, label, VOC.num_classes))
            if tp + fp + fn > 0]


def label_path(variant: str, real_id: str) -> str:
    """A label map's path relative to the cache dir; merge reuses blocky's files."""
    return f"labels/{VARIANTS['blocky' if variant == 'merge' else variant]}/{real_id}.png"


def derive(root: Path, cache_dir: Path) -> list[RealImage]:
    """Decode every real mask once, write its shifted and blocky label maps, count both."""
    layout, reals, seen = open_layout(root), [], set()
    for split in layout.splits:
        for image_id in read_split_ids(split):
            if image_id in seen:
                continue
            seen.add(image_id)
            mask_path = layout.mask_path(split, image_id)
            gt = read_mask(mask_path)
            maps = {"shifted": shifted(gt), "blocky": blocky(gt)}
            for name, label in maps.items():
                write_label_map(cache_dir / label_path(name, image_id), label)
            counts = {name: count_rows(gt, label) for name, label in maps.items()}
            reals.append(RealImage(image_id, layout.image_path(split, image_id), mask_path,
                                   *gt.shape, image_labels(gt, VOC), {**counts, "merge": counts["blocky"]},
                                   conflict_rows(maps["shifted"], maps["blocky"])))
    return sorted(reals, key=lambda r: r.image_id)


def copies(reals: list[RealImage], n_images: int) -> list[tuple[str, RealImage]]:
    """``n_images`` (image id, real image) pairs: the real ids first, then ``<id>~1``, ``<id>~2``..."""
    return [(real.image_id if k < len(reals) else f"{real.image_id}~{k // len(reals)}", real)
            for k, real in ((k, reals[k % len(reals)]) for k in range(n_images))]


def record(cache_dir: Path, root: Path, split: list[tuple[str, RealImage]]) -> None:
    """The dataset, split, variants, label maps, counts, conflicts and flags, in one transaction."""
    with connect(cache_dir) as con:
        queries.upsert_dataset(con, DATASET_ID, "qa-browse bench", str(root), VOC, "vocdevkit")
        queries.replace_split_images(con, DATASET_ID, SPLIT, [
            (image_id, str(r.image_path), str(r.mask_path), r.height, r.width, list(r.labels), None)
            for image_id, r in split])
        queries.mark_scanned(con, DATASET_ID)  # so an app opened on --keep queues no scan
        for name, variant_id in VARIANTS.items():
            queries.insert_variant(con, Variant(
                id=variant_id, dataset_id=DATASET_ID, name=f"bench {name}", method=name, step=name, params={},
                steps=({"name": name, "params": {}},), source_id=None, code_version=__version__,
                created_at=time.time()))
            # Jobs go queued -> running -> done as under the worker, so none is left to run.
            job_id = queries.insert_job(con, "label", DATASET_ID, variant_id, SPLIT, None)
            queries.claim_job(con, job_id, "bench")
            for start in range(0, len(split), BATCH):
                chunk = split[start:start + BATCH]
                queries.record_results(con, job_id, variant_id, queries.ResultRows(
                    label_maps=[(image_id, label_path(name, r.image_id), None) for image_id, r in chunk],
                    counts=[(image_id, *row) for image_id, r in chunk for row in r.counts[name]],
                    errors=[],
                    conflicts=[(image_id, *row) for image_id, r in chunk for row in r.conflicts] if name == "merge"
                    else []))
            queries.finish_job(con, job_id, JobStatus.DONE)
        kinds = list(qa.FLAG_KINDS)
        for k, (image_id, _) in enumerate(split[::max(1, len(split) // N_FLAGS)][:N_FLAGS]):
            kind = kinds[k % len(kinds)]
            qa.set_flag(con, DATASET_ID, image_id, kind, note=f"bench flag {k}",
                        variant_id=VARIANTS["shifted"] if kind == "method_failure" else None)


def median_ms(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, in ms; ``setup()`` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def find_page(cache_dir: Path, query: qa.ImageQuery, offset: int) -> qa.ImagePage:
    with connect(cache_dir, read_only=True) as con:
        return qa.find_images(con, DATASET_ID, query, limit=PAGE, offset=offset)


def page_queries() -> list[tuple[str, qa.ImageQuery]]:
    """What the page asks: every sort key (with a class too, except the id order) and each filter."""
    shift, dog = VARIANTS["shifted"], CLASS_ID
    found = []
    for sort in qa.SORTS:
        base = {"variant": VARIANTS["merge"] if sort == "conflicts" else shift, "sort": sort,
                "other": VARIANTS["blocky"] if sort in ("disagreement", "gain") else None}
        found.append((f"sort {sort}", qa.ImageQuery(SPLIT, **base)))
        if sort != "image":  # the id order has no class to be about
            found.append((f"sort {sort}, class dog", qa.ImageQuery(SPLIT, **base, class_id=dog)))
    found += [("filter has dog", qa.ImageQuery(SPLIT, classes=(dog,), variant=shift)),
              ("filter has dog, sort errors of dog",
               qa.ImageQuery(SPLIT, classes=(dog,), variant=shift, class_id=dog, sort="errors")),
              *((f"filter {f}", qa.ImageQuery(SPLIT, variant=shift, flagged=f))
                for f in ("flagged", "unflagged", "wrong_gt"))]
    return found


def baseline_seconds(cache_dir: Path, reals: list[RealImage], sample: int, n_images: int) -> tuple[float, float]:
    """(ms per image, seconds for ``n_images``): the dog IoU of shifted from decoded files."""
    sample_reals = reals[:sample]
    start = time.perf_counter()
    for r in sample_reals:
        gt = read_mask(r.mask_path, (r.height, r.width))
        iou_from_counts(confusion_counts(gt, read_label_map(cache_dir / label_path("shifted", r.image_id)), VOC.num_classes))[CLASS_ID]
    per_image = (time.perf_counter() - start) / len(sample_reals)
    return per_image * 1000, per_image * n_images


def load_page(cache_dir: Path, files: list[tuple[Path, Path]]) -> None:
    for image_path, label in files:
        overlay(image_thumbnail(cache_dir, image_path), label_thumbnail(cache_dir, label), VOC)


def image_view_files(cache_dir: Path, r: RealImage) -> None:
    rgb = read_image(r.image_path)
    read_mask(r.mask_path, rgb.shape[:2])
    for name in ("shifted", "blocky"):
        overlay(rgb, read_label_map(cache_dir / label_path(name, r.image_id)), VOC)


def image_view_rows(cache_dir: Path, image_id: str) -> None:
    with connect(cache_dir, read_only=True) as con:
        qa.image_row(con, DATASET_ID, SPLIT, image_id)
        qa.image_label_maps(con, DATASET_ID, image_id)
        qa.flags(con, DATASET_ID)


def run(cache_dir: Path, root: Path, n_images: int, repeats: int, baseline_images: int) -> dict[str, Any]:
    start = time.perf_counter()
    reals = derive(root, cache_dir)
    derive_s = time.perf_counter() - start
    split = copies(reals, n_images)
    by_id = dict(split)
    start = time.perf_counter()
    record(cache_dir, root, split)
    result: dict[str, Any] = {
        "images": n_images, "real_images": len(reals), "repeats": repeats, "cpu_cores": os.cpu_count(),
        "build_label_maps_s": derive_s, "build_db_s": time.perf_counter() - start,
        "db_mb": db_path(cache_dir).stat().st_size / 2 ** 20}
    result["baseline_ms_per_image"], result["baseline_s"] = baseline_seconds(cache_dir, reals, baseline_images, n_images)
    with connect(cache_dir, read_only=True):
        pass  # the first reader of a process opens a writer once (schema check): not a page cost
    rows: list[dict[str, Any]] = []

    def add(name: str, ms: float, matched: int | None = None, ranks: bool = False) -> None:
        rows.append({"name": name, "ms": ms, "matched": matched,
                     "ratio": result["baseline_s"] / (ms / 1000) if ranks else None})

    def open_close() -> None:
        with connect(cache_dir, read_only=True):
            pass

    add("open + close a read-only connection (in every DB line)", median_ms(open_close, repeats))
    for name, query in page_queries():
        total = find_page(cache_dir, query, 0).total
        for label, offset in (("first page", 0), ("deep page", total // 2)):
            add(f"{name}, {label}", median_ms(lambda: find_page(cache_dir, query, offset), repeats), total,
                ranks=query.sort != "image")

    def with_con(fn: Callable[..., Any]) -> Callable[[], Any]:
        def call() -> Any:
            with connect(cache_dir, read_only=True) as con:
                return fn(con, DATASET_ID)
        return call

    add("flags() listing", median_ms(with_con(qa.flags), repeats), len(with_con(qa.flags)()))
    add("flagged_ids()", median_ms(with_con(qa.flagged_ids), repeats), len(with_con(qa.flagged_ids)()))
    top = find_page(cache_dir, qa.ImageQuery(SPLIT, variant=VARIANTS["shifted"], sort="errors"), 0).rows
    add("image view: row + label maps + flags (DB)", median_ms(lambda: image_view_rows(cache_dir, top[0]["image_id"]),
                                                               repeats))
    page_files = [(by_id[row["image_id"]].image_path, cache_dir / label_path("shifted", by_id[row["image_id"]].image_id))
                  for row in top]
    distinct = [(r.image_path, cache_dir / label_path("shifted", r.image_id)) for r in reals[:PAGE]]
    empty_thumbs = lambda: shutil.rmtree(cache_dir / "thumbs", ignore_errors=True)  # noqa: E731
    add(f"errors page: thumbs + overlay x{len(top)}, cold ({len(set(page_files))} distinct files)",
        median_ms(lambda: load_page(cache_dir, page_files), repeats, setup=empty_thumbs))
    add(f"errors page: thumbs + overlay x{len(top)}, warm", median_ms(lambda: load_page(cache_dir, page_files), repeats))
    add(f"{PAGE} distinct images: thumbs + overlay, cold",
        median_ms(lambda: load_page(cache_dir, distinct), repeats, setup=empty_thumbs))
    add("image view: JPEG + mask + 2 label maps, 2 overlays (full size)",
        median_ms(lambda: image_view_files(cache_dir, by_id[top[0]["image_id"]]), repeats))
    for name, ms in page_runs(cache_dir):
        add(name, ms)
    result["interactions"] = rows
    return result


def page_runs(cache_dir: Path) -> list[tuple[str, float]]:
    """The QA page itself, run by Streamlit's AppTest as a user clicks through it: each step's
    wall time in ms (the whole script: widgets, the page's cached reads, thumbnails, overlays).
    Each step runs once, in order, on an emptied thumbnail folder: what a first visit costs."""
    from streamlit.testing.v1 import AppTest

    os.environ["ISLE_CACHE_DIR"] = str(cache_dir)
    shutil.rmtree(cache_dir / "thumbs", ignore_errors=True)
    at = AppTest.from_file(str(REPO / "app_pages" / "qa.py"), default_timeout=300)

    def sort_errors() -> None:
        at.selectbox(key="qa_sort").set_value("errors")
        at.selectbox(key="qa_variant").set_value(VARIANTS["shifted"])
        at.selectbox(key="qa_class").set_value(CLASS_ID)

    def open_first() -> None:
        at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("qa_open_"))).click()

    steps = [("page: first load (24 thumbnails, id order)", lambda: None),
             ("page: sort by error pixels of dog in shifted", sort_errors),
             ("page: next page", lambda: at.number_input(key="qa_page").increment()),
             ("page: open an image (full-size overlays, legend)", open_first),
             ("page: back to the grid", lambda: at.button(key="qa_back").click())]
    times = []
    for name, step in steps:
        step()
        start = time.perf_counter()
        at.run()
        times.append((name, (time.perf_counter() - start) * 1000))
        if at.exception:
            raise RuntimeError(f"{name}: the page raised {at.exception[0].value}")
    return times


def report(result: dict[str, Any]) -> None:
    print(f"{result['images']:,} images ({result['real_images']:,} real, repeated); {result['cpu_cores']} CPU cores; "
          f"median of {result['repeats']}")
    print(f"build: label maps + counts {result['build_label_maps_s']:.1f} s, DuckDB {result['build_db_s']:.1f} s; "
          f"DB file {result['db_mb']:.1f} MB")
    print(f"baseline (decode mask + label map, dog IoU): {result['baseline_ms_per_image']:.2f} ms/image -> "
          f"{result['baseline_s']:.1f} s for {result['images']:,} images")
    width = max(len(row["name"]) for row in result["interactions"])
    print(f"{'interaction':<{width}}  {'ms':>8}  {'matched':>7}  {'baseline/query':>14}")
    for row in result["interactions"]:
        matched = "" if row["matched"] is None else f"{row['matched']:,}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:,.0f}"
        print(f"{row['name']:<{width}}  {row['ms']:8.1f}  {matched:>7}  {ratio:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_voc_root(), help="a VOCdevkit root")
    parser.add_argument("--images", type=int, default=10_000, help="images in the benchmark split")
    parser.add_argument("--repeats", type=int, default=5, help="runs per interaction; the median is printed")
    parser.add_argument("--baseline-images", type=int, default=300, help="images decoded to time the baseline")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch cache and print its path")
    args = parser.parse_args()
    cache_dir = Path(tempfile.mkdtemp(prefix="qa_browse_"))
    try:
        result = run(cache_dir, args.root.resolve(), args.images, args.repeats, args.baseline_images)
    finally:
        if args.keep:
            print(f"scratch cache kept at {cache_dir}")
        else:
            shutil.rmtree(cache_dir, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
