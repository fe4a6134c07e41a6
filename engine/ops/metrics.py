"""Per-image, per-class confusion counts: the numbers every IoU in the workbench is summed from.

Convention (VOC devkit; mmsegmentation ``intersect_and_union``): ground-truth pixels labelled 255
are ignored. A predicted 255 (an undecided pseudo-label pixel) predicts no class, so it is a false
negative of the true class and a false positive of none.
"""

from __future__ import annotations

import numpy as np

from cache.classes import IGNORE_INDEX


def confusion_counts(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """TP, FP, FN per class for one image.

    gt, pred: ``(H, W) uint8``, values ``0..num_classes-1`` or 255; num_classes: of the class set.
    Returns ``(num_classes, 3) int64``: columns TP, FP, FN.
    Raises ``ValueError`` when the shapes differ or a value is out of range.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"label map shape {pred.shape} differs from ground truth {gt.shape}")
    valid = gt != IGNORE_INDEX
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    p[p == IGNORE_INDEX] = num_classes  # an extra "no class" column
    if g.size and (g.max() >= num_classes or p.max() > num_classes):
        raise ValueError(f"label values must be 0..{num_classes - 1} or {IGNORE_INDEX}")
    confusion = np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    confusion = confusion.reshape(num_classes, num_classes + 1)
    tp = np.diag(confusion[:, :num_classes])
    fp = confusion[:, :num_classes].sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    return np.stack([tp, fp, fn], axis=1)


def iou_from_counts(counts: np.ndarray) -> np.ndarray:
    """``counts: (C, 3)`` TP, FP, FN -> ``(C,) float64`` IoU, NaN where TP + FP + FN = 0."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)
