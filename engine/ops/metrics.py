"""Per-image, per-class confusion counts: the numbers every IoU in the workbench is summed from.

Convention (VOC devkit; mmsegmentation ``intersect_and_union``): ground-truth pixels labelled 255
are ignored. A predicted 255 (an undecided pseudo-label pixel) predicts no class, so it is a false
negative of the true class and a false positive of none.
"""

from __future__ import annotations

import numpy as np

from cache.classes import IGNORE_INDEX


def confusion_cells(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The confusion matrix of one image: ``cells[g, p]`` pixels of ground-truth class g labelled
    p, column ``num_classes`` for a predicted 255; ground-truth 255 pixels are left out.

    gt, pred: ``(H, W) uint8``, values ``0..num_classes-1`` or 255; num_classes: of the class set.
    Returns ``(num_classes, num_classes + 1) int64``, from one joint histogram of the value pairs.
    Raises ``ValueError`` when the shapes differ or a value is out of range.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"label map shape {pred.shape} differs from ground truth {gt.shape}")
    for values in (gt, pred):  # the joint histogram packs a pair into 16 bits: wider values must fit
        if values.dtype != np.uint8 and values.size and (values.min() < 0 or values.max() > IGNORE_INDEX):
            raise ValueError(f"label values must be 0..{num_classes - 1} or {IGNORE_INDEX}")
    joint = np.bincount(((gt.astype(np.intp) << 8) | pred.astype(np.intp)).ravel(),
                        minlength=1 << 16).reshape(256, 256)
    if joint[num_classes:IGNORE_INDEX].any() or joint[:num_classes, num_classes:IGNORE_INDEX].any():
        raise ValueError(f"label values must be 0..{num_classes - 1} or {IGNORE_INDEX}")
    return np.concatenate([joint[:num_classes, :num_classes], joint[:num_classes, IGNORE_INDEX:]], axis=1)


def counts_from_cells(cells: np.ndarray) -> np.ndarray:
    """``confusion_cells`` ``(C, C + 1)`` -> ``(C, 3) int64`` TP, FP, FN per class."""
    classified = cells[:, :-1]
    tp = np.diag(classified)
    return np.stack([tp, classified.sum(axis=0) - tp, cells.sum(axis=1) - tp], axis=1)


def confusion_counts(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """TP, FP, FN per class for one image.

    gt, pred: ``(H, W) uint8``, values ``0..num_classes-1`` or 255; num_classes: of the class set.
    Returns ``(num_classes, 3) int64``: columns TP, FP, FN.
    Raises ``ValueError`` when the shapes differ or a value is out of range.
    """
    return counts_from_cells(confusion_cells(gt, pred, num_classes))


def iou_from_counts(counts: np.ndarray) -> np.ndarray:
    """``counts: (C, 3)`` TP, FP, FN -> ``(C,) float64`` IoU, NaN where TP + FP + FN = 0."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)
