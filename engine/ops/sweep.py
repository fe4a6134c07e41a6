"""Per-image counts the diagnostics are summed from: a background-threshold sweep and the sparse
class confusion, both against the ground truth (GT 255 ignored, as ``engine.ops.metrics``).

Threshold sweep. A CAM pseudo-label is the argmax over ``[t, cams]`` (IRN ``step/eval_cam.py``;
isim Sec. 4.1 step ii): a pixel takes its best-scoring class ``a`` when that score ``s`` exceeds
the background threshold ``t``, else background (ties go to background). So ``(s, a)`` per pixel
(``peak``) decides the label at every ``t``, and one histogram of (ground truth, ``a``, grid
bin of ``s``) gives the counts of every threshold of a grid at once, without re-inference. The
reference repositories draw this curve by re-running their evaluation per threshold (IRN
``eval_cam.py --cam_eval_thres``; SEAM / ReCAM ``eval.py`` loop over thresholds).

With one threshold per class (``t_a`` for the pixels whose best class is ``a``), an object
class's TP, FP and FN depend only on its own threshold, so the counts of a grid serve any
per-class choice; background then follows from ``fp_bg`` (``cache.diagnostics.background_counts``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cache.classes import IGNORE_INDEX
from engine.ops.metrics import confusion_cells

# 0.05, 0.10, ..., 0.60: the range the reference repositories sweep (IRN 0.15, isim 0.3, SEAM 0.2 ... 0.4)
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 13))

SWEEP_COLUMNS = ("tp", "fp", "fn", "fp_bg")  # fp_bg: the FP pixels whose ground truth is background


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """``grid`` as a sorted tuple of distinct thresholds in [0, 1]; ``ValueError`` otherwise."""
    values = tuple(float(t) for t in grid)
    if not values or any(not 0.0 <= t <= 1.0 for t in values) or len(set(values)) != len(values):
        raise ValueError(f"a threshold grid holds distinct values in [0, 1], got {list(grid)}")
    return tuple(sorted(values))


def peak(cams: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Best object score and its class per pixel.

    cams: ``(K, H, W) float32`` in [0, 1], channel k for object class ``classes[k]`` (>= 1).
    Returns ``(H, W) float32`` scores (0 where K = 0) and ``(H, W) uint8`` class ids (the lower
    channel on ties, as ``np.argmax``; 0 where K = 0).
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"expected cams of shape ({len(classes)}, H, W), got {cams.shape}")
    if not len(classes):
        return np.zeros(cams.shape[1:], np.float32), np.zeros(cams.shape[1:], np.uint8)
    best = np.argmax(cams, axis=0)
    score = np.take_along_axis(cams, best[None], axis=0)[0]
    return score, np.asarray(classes, dtype=np.uint8)[best]


def label_at(score: np.ndarray, best: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The pseudo-label of a ``peak`` at per-class thresholds.

    score ``(H, W) float32``, best ``(H, W) uint8``; thresholds: ``(C,) float32``, entry c the
    background threshold of pixels whose best class is c (a constant threshold: every entry
    equal). Returns ``(H, W) uint8``: ``best`` where ``score > thresholds[best]``, else 0.
    """
    thresholds = np.asarray(thresholds, dtype=np.float32)
    return np.where(score > thresholds[best], best, 0).astype(np.uint8)


def sweep_counts(gt: np.ndarray, score: np.ndarray, best: np.ndarray, grid: Sequence[float],
                 num_classes: int) -> np.ndarray:
    """Counts of the pseudo-labels ``label_at(score, best, t)`` for every ``t`` of ``grid``.

    gt: ``(H, W) uint8`` ground truth, 0..num_classes-1 or 255 (ignored); score, best: a ``peak``
    of the same shape; grid: J thresholds (``check_grid``), compared in float32 as the label is.
    Returns ``(J, C, 4) int64``: per threshold and class TP, FP, FN and ``fp_bg`` (the FP pixels
    whose ground truth is background, 0 for the background row). Row ``[j]`` equals
    ``confusion_counts(gt, label_at(score, best, grid[j]))`` in its first three columns.
    Raises ``ValueError`` for mismatched shapes or values out of range.
    """
    grid = np.asarray(check_grid(grid), dtype=np.float32)
    if not gt.shape == score.shape == best.shape:
        raise ValueError(f"ground truth {gt.shape}, score {score.shape} and best class {best.shape} differ")
    valid = gt != IGNORE_INDEX
    g = gt[valid].astype(np.int64)
    a = best[valid].astype(np.int64)
    if g.size and (g.max() >= num_classes or a.max() >= num_classes):
        raise ValueError(f"label values must be 0..{num_classes - 1} or {IGNORE_INDEX}")
    # bins[i] = how many grid thresholds lie below the pixel's score: it is foreground at those.
    bins = np.searchsorted(grid, score[valid], side="left").astype(np.int64)
    n_bins = len(grid) + 1
    hist = np.bincount((g * num_classes + a) * n_bins + bins, minlength=num_classes * num_classes * n_bins)
    hist = hist.reshape(num_classes, num_classes, n_bins)
    # above[g, a, j]: pixels of ground truth g, best class a, score > grid[j]
    above = np.cumsum(hist[:, :, ::-1], axis=2)[:, :, ::-1][:, :, 1:]
    labelled = hist.sum(axis=2)  # (g, a), every threshold
    fg = above.transpose(2, 0, 1)  # (J, g, a): predicted a (a >= 1)
    fg[:, :, 0] = 0  # a pixel whose best class is background (K = 0) is background everywhere
    pred_bg = labelled.sum(axis=1)[None] - fg.sum(axis=2)  # (J, g): predicted background
    confusion = fg.copy()
    confusion[:, :, 0] = pred_bg  # (J, g, p) with p = predicted label
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    fp = confusion.sum(axis=1) - tp
    fn = confusion.sum(axis=2) - tp
    fp_bg = confusion[:, 0, :].copy()
    fp_bg[:, 0] = 0
    return np.stack([tp, fp, fn, fp_bg], axis=2).astype(np.int64)


def confusion_pairs(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The sparse confusion of one label map: which ground-truth class was labelled as which.

    gt, pred: ``(H, W) uint8``, values 0..num_classes-1 or 255 (GT 255 ignored; a predicted 255,
    undecided, is kept as predicted class 255). Returns ``(n, 3) int64`` rows (gt class, predicted
    class, pixels), only non-zero ones, ordered by gt then predicted class. Per class c the rows
    give ``confusion_counts``: TP = (c, c), FN = the other rows of gt c (255 included), FP = the
    other rows of predicted c. Raises ``ValueError`` for mismatched shapes or values out of range.
    """
    return pairs_from_cells(confusion_cells(gt, pred, num_classes))


def pairs_from_cells(cells: np.ndarray) -> np.ndarray:
    """``metrics.confusion_cells`` ``(C, C + 1)`` -> the ``confusion_pairs`` rows ``(n, 3) int64``."""
    num_classes = cells.shape[0]
    nonzero = np.flatnonzero(cells)
    gt_class, pred_class = np.divmod(nonzero, num_classes + 1)
    pred_class = np.where(pred_class == num_classes, IGNORE_INDEX, pred_class)
    return np.stack([gt_class, pred_class, cells.ravel()[nonzero]], axis=1).astype(np.int64)
