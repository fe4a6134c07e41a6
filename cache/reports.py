"""Per-class IoU tables assembled from one aggregation over the cached counts (no label map read)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache import queries
from cache.classes import ClassSet

Con = queries.Con


@dataclass(frozen=True)
class IoUTable:
    """Per-class IoU of several variants over the usable images of one split.

    classes: the dataset's class set; C = ``classes.num_classes`` columns, column = label value.
    iou: ``(V, C) float64`` in [0, 1], NaN where the split has no image of the class.
    tp, fp, fn: ``(V, C) int64`` pixel counts; n_images: ``(V, C) int64`` images whose ground
    truth holds the class (among those the variant labelled); labelled: ``(V,)`` label maps;
    with_truth: ``(V,)`` of those, the images with ground truth (the figures' sample size).
    miou: ``(V,)`` mean over the classes with at least one image, NaN for a variant with none.
    source_ids: the variant each row refines (``variants.source_id``), None for a method.
    """

    classes: ClassSet
    variant_ids: list[str]
    names: list[str]
    source_ids: list[str | None]
    labelled: np.ndarray
    with_truth: np.ndarray
    iou: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    n_images: np.ndarray
    miou: np.ndarray


def iou_table(con: Con, dataset_id: str, split: str, image_ids: Sequence[str] | None = None) -> IoUTable:
    """Every variant of ``dataset_id`` with at least one label map on ``split``; counts summed
    over ``image_ids`` only when given (a selection or report subset)."""
    classes = queries.get_dataset(con, dataset_id).classes
    labelled = queries.labelled_in_split(con, dataset_id, split, image_ids)
    with_truth = queries.labelled_in_split(con, dataset_id, split, image_ids, with_truth=True)
    variants = [v for v in queries.variants(con, dataset_id) if labelled.get(v.id, 0) > 0]
    index = {v.id: row for row, v in enumerate(variants)}
    shape = (len(variants), classes.num_classes)
    tp, fp, fn, n_images = (np.zeros(shape, np.int64) for _ in range(4))
    for r in queries.class_counts(con, dataset_id, split, image_ids):
        if r["variant_id"] in index:
            at = (index[r["variant_id"]], r["class_id"])
            tp[at], fp[at], fn[at], n_images[at] = r["tp"], r["fp"], r["fn"], r["n_images"]
    iou, miou = _iou(tp, fp, fn, n_images)
    return IoUTable(
        classes=classes,
        variant_ids=[v.id for v in variants],
        names=[v.name for v in variants],
        source_ids=[v.source_id for v in variants],
        labelled=np.array([labelled[v.id] for v in variants], np.int64),
        with_truth=np.array([with_truth.get(v.id, 0) for v in variants], np.int64),
        iou=iou, tp=tp, fp=fp, fn=fn, n_images=n_images, miou=miou,
    )


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, n_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V, C)`` IoU (NaN where no image holds the class) and ``(V,)`` mIoU over the classes with images."""
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(n_images > 0, tp / np.maximum(tp + fp + fn, 1), np.nan)
    has_class = n_images > 0
    miou = np.array([row[mask].mean() if mask.any() else np.nan for row, mask in zip(iou, has_class)])
    return iou, miou


def recount(table: IoUTable, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> IoUTable:
    """``table`` with other TP, FP, FN pixel counts ``(V, C) int64`` (e.g. its predicted 255 taken
    out of FN: ``cache.diagnostics.apply_undecided``), IoU and mIoU recomputed; images unchanged."""
    if not tp.shape == fp.shape == fn.shape == table.tp.shape:
        raise ValueError(f"expected counts of shape {table.tp.shape}, got {tp.shape}, {fp.shape}, {fn.shape}")
    iou, miou = _iou(tp, fp, fn, table.n_images)
    return dataclasses.replace(table, tp=tp, fp=fp, fn=fn, iou=iou, miou=miou)


def insert_row(table: IoUTable, at: int, variant_id: str, name: str, source_id: str | None, labelled: int,
               with_truth: int, counts: np.ndarray, n_images: np.ndarray) -> IoUTable:
    """``table`` with one more row before row ``at`` (e.g. a variant's counts at another
    background threshold, ``cache.diagnostics.SweepTable``): counts ``(C, 3) int64`` TP, FP, FN,
    n_images ``(C,) int64``."""
    size = table.classes.num_classes
    if counts.shape != (size, 3) or n_images.shape != (size,):
        raise ValueError(f"expected counts ({size}, 3) and n_images ({size},), got {counts.shape}, {n_images.shape}")

    def put(values: np.ndarray, row) -> np.ndarray:
        return np.insert(values, at, row, axis=0)

    tp, fp, fn = (put(getattr(table, k), counts[:, j]) for j, k in enumerate(("tp", "fp", "fn")))
    images = put(table.n_images, n_images)
    iou, miou = _iou(tp, fp, fn, images)
    return dataclasses.replace(
        table, variant_ids=[*table.variant_ids[:at], variant_id, *table.variant_ids[at:]],
        names=[*table.names[:at], name, *table.names[at:]],
        source_ids=[*table.source_ids[:at], source_id, *table.source_ids[at:]],
        labelled=put(table.labelled, labelled), with_truth=put(table.with_truth, with_truth),
        tp=tp, fp=fp, fn=fn, n_images=images, iou=iou, miou=miou)


def select_rows(table: IoUTable, variant_ids: list[str]) -> IoUTable:
    """The rows of ``table`` for ``variant_ids`` (in that order; ids without a row are skipped)."""
    index = {vid: row for row, vid in enumerate(table.variant_ids)}
    rows = [index[v] for v in variant_ids if v in index]
    return dataclasses.replace(
        table, variant_ids=[table.variant_ids[r] for r in rows], names=[table.names[r] for r in rows],
        source_ids=[table.source_ids[r] for r in rows],
        **{name: getattr(table, name)[rows]
           for name in ("labelled", "with_truth", "iou", "tp", "fp", "fn", "n_images", "miou")})


def tree_order(table: IoUTable) -> tuple[list[int], list[int]]:
    """The rows as a tree of refinements: ``(row indices, depth of each)``, both of length V.

    A root is a row whose source is None or not in the table (depth 0), kept in table order; each
    is followed depth-first by the rows refining it, siblings ordered by name.
    """
    index = {vid: row for row, vid in enumerate(table.variant_ids)}
    children: dict[int, list[int]] = {row: [] for row in range(len(index))}
    roots = []
    for row, source in enumerate(table.source_ids):
        if source in index:
            children[index[source]].append(row)
        else:
            roots.append(row)
    order, depths = [], []
    stack = [(row, 0) for row in reversed(roots)]
    while stack:
        row, depth = stack.pop()
        order.append(row)
        depths.append(depth)
        stack.extend((child, depth + 1) for child in sorted(children[row], key=table.names.__getitem__, reverse=True))
    return order, depths


@dataclass(frozen=True)
class GainTable:
    """What each refinement changes: refined IoU minus its source's, for the R rows of an
    ``IoUTable`` whose source is also in it.

    rows, sources: ``(R,) int64`` row indices into the table (refined, source), in tree order.
    gain: ``(R, C) float64`` in [-1, 1], NaN where the class has no image; miou_gain: ``(R,)``.
    """

    rows: np.ndarray
    sources: np.ndarray
    gain: np.ndarray
    miou_gain: np.ndarray


def gain_table(table: IoUTable) -> GainTable:
    """Every "refined vs source" pair of ``table`` (see ``GainTable``); R = 0 when there is none."""
    index = {vid: row for row, vid in enumerate(table.variant_ids)}
    order, _ = tree_order(table)
    rows = np.array([row for row in order if table.source_ids[row] in index], np.int64)
    sources = np.array([index[table.source_ids[row]] for row in rows], np.int64)
    return GainTable(rows=rows, sources=sources, gain=table.iou[rows] - table.iou[sources],
                     miou_gain=table.miou[rows] - table.miou[sources])


@dataclass(frozen=True)
class ImageCounts:
    """Dense per-image counts of chosen variants: what cross-validation and the bootstrap of an
    ISLE assignment resample (``engine/isle/validation.py``).

    image_ids: the N usable images with ground truth, in the order asked (id order by default);
    variant_ids: the V variants, in the order asked; counts: ``(N, V, C, 3) int64`` TP, FP, FN
    pixels per image, variant and class (0 where the cache stores no row: nothing predicted or
    true), N * V * C * 24 bytes.
    """

    classes: ClassSet
    image_ids: list[str]
    variant_ids: list[str]
    counts: np.ndarray


def image_counts(con: Con, dataset_id: str, split: str, variant_ids: Sequence[str],
                 image_ids: Sequence[str] | None = None) -> ImageCounts:
    """The per-image counts of ``variant_ids`` over the split's usable images with ground truth
    (only those of ``image_ids`` when given, in that order), from one scan of the counts rows.
    Raises ``KeyError`` for a variant without a label map on every chosen image."""
    classes = queries.get_dataset(con, dataset_id).classes
    truth = [r[0] for r in con.execute(
        "SELECT image_id FROM images WHERE dataset_id = ? AND split = ? AND problem IS NULL "
        "AND mask_path IS NOT NULL ORDER BY image_id", [dataset_id, split]).fetchall()]
    if image_ids is not None:
        keep = set(truth)
        truth = [i for i in image_ids if i in keep]
    variant_ids = list(variant_ids)
    labelled = queries.labelled_in_split(con, dataset_id, split, truth, with_truth=True)
    short = [v for v in variant_ids if labelled.get(v, 0) < len(truth)]
    if short:
        raise KeyError(f"variant(s) {short} lack label maps on some of the {len(truth)} images")
    rows = con.execute(
        """WITH chosen AS (SELECT unnest(?::VARCHAR[]) AS image_id, unnest(range(?)) AS n),
                wanted AS (SELECT unnest(?::VARCHAR[]) AS variant_id, unnest(range(?)) AS v)
           SELECT chosen.n, wanted.v, c.class_id::INTEGER AS class_id, c.tp, c.fp, c.fn
           FROM counts c JOIN chosen USING (image_id) JOIN wanted USING (variant_id)""",
        [truth, len(truth), variant_ids, len(variant_ids)]).fetchnumpy()
    counts = np.zeros((len(truth), len(variant_ids), classes.num_classes, 3), np.int64)
    at = (rows["n"].astype(np.int64), rows["v"].astype(np.int64), rows["class_id"].astype(np.int64))
    counts[at] = np.stack([rows["tp"], rows["fp"], rows["fn"]], axis=1)
    return ImageCounts(classes=classes, image_ids=truth, variant_ids=variant_ids, counts=counts)
