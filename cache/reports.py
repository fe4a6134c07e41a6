"""Per-class IoU tables assembled from one aggregation over the cached counts (no label map read)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache import queries
from cache.voc import NUM_CLASSES

Con = queries.Con


@dataclass(frozen=True)
class IoUTable:
    """Per-class IoU of several variants over the usable images of one split.

    iou: ``(V, 21) float64`` in [0, 1], NaN where the split has no image of the class.
    tp, fp, fn: ``(V, 21) int64`` pixel counts; n_images: ``(V, 21) int64`` images whose ground
    truth holds the class (among those the variant labelled); labelled: ``(V,)`` label maps.
    miou: ``(V,)`` mean over the classes with at least one image, NaN for a variant with none.
    """

    variant_ids: list[str]
    names: list[str]
    labelled: np.ndarray
    iou: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    n_images: np.ndarray
    miou: np.ndarray


def iou_table(con: Con, dataset_id: str, split: str) -> IoUTable:
    """Every variant of ``dataset_id`` with at least one label map on ``split``."""
    labelled = queries.labelled_in_split(con, dataset_id, split)
    variants = [v for v in queries.variants(con, dataset_id) if labelled.get(v["id"], 0) > 0]
    index = {v["id"]: row for row, v in enumerate(variants)}
    shape = (len(variants), NUM_CLASSES)
    tp, fp, fn, n_images = (np.zeros(shape, np.int64) for _ in range(4))
    for r in queries.class_counts(con, dataset_id, split):
        if r["variant_id"] in index:
            at = (index[r["variant_id"]], r["class_id"])
            tp[at], fp[at], fn[at], n_images[at] = r["tp"], r["fp"], r["fn"], r["n_images"]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(n_images > 0, tp / np.maximum(tp + fp + fn, 1), np.nan)
    has_class = n_images > 0
    miou = np.array([row[mask].mean() if mask.any() else np.nan for row, mask in zip(iou, has_class)])
    return IoUTable(
        variant_ids=[v["id"] for v in variants],
        names=[v["name"] for v in variants],
        labelled=np.array([labelled[v["id"]] for v in variants], np.int64),
        iou=iou, tp=tp, fp=fp, fn=fn, n_images=n_images, miou=miou,
    )
