"""The diagnostics beside per-class IoU, from cached counts alone (no label map read): precision,
recall and error shares; background-threshold sweeps with a per-class tuned threshold; the class
confusion matrix; and the evaluation protocol a figure was made with.

The per-image rows come from the worker (``engine.ops.sweep``: ``sweep_counts`` and
``confusion``); every function here sums them over a split or a subset in one query and does
the rest on small arrays. A tuned threshold is chosen on a *selection* subset and scored on a
disjoint *report* subset, as an ISLE assignment is (ISLE Sec. 3; ``engine.isle.numerics``), so
the flattery of tuning on ground truth shows as the gap between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache import queries
from cache.classes import IGNORE_INDEX, ClassSet

Con = queries.Con

METRICS: dict[str, str] = {
    "iou": "IoU = TP / (TP + FP + FN)",
    "precision": "precision = TP / (TP + FP)",
    "recall": "recall = TP / (TP + FN)",
    "fp share": "FP share = FP / (TP + FP + FN)",
    "fn share": "FN share = FN / (TP + FP + FN)",
}
"""Per-class figures a heatmap can show; FP share + FN share = 1 - IoU."""

UNDECIDED = {"miss": "a predicted 255 is a miss (FN) of the true class",
             "ignore": "a predicted 255 is ignored, coverage shown beside"}
"""What a pseudo-label's undecided pixels (255) count as."""


def metric_values(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, metric: str) -> np.ndarray:
    """One of ``METRICS`` from TP, FP, FN pixel counts of any shape -> float64 in [0, 1] of the
    same shape, NaN where its denominator is 0. Raises ``ValueError`` for an unknown metric."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    numerator, denominator = {
        "iou": (tp, tp + fp + fn), "precision": (tp, tp + fp), "recall": (tp, tp + fn),
        "fp share": (fp, tp + fp + fn), "fn share": (fn, tp + fp + fn),
    }.get(metric, (None, None))
    if numerator is None:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


@dataclass(frozen=True)
class Protocol:
    """How a figure was made: what a predicted 255 counts as (``UNDECIDED``), the ground-truth
    folder, the split list and how many of its images carry ground truth."""

    undecided: str
    ground_truth: str | None
    split: str
    images: int

    def __post_init__(self) -> None:
        if self.undecided not in UNDECIDED:
            raise ValueError(f"unknown undecided rule {self.undecided!r}; expected one of {list(UNDECIDED)}")

    @property
    def caption(self) -> str:
        truth = self.ground_truth or "no ground truth"
        return (f"protocol: split list {self.split} ({self.images:,} images with ground truth), "
                f"ground truth {truth}, GT 255 ignored, predicted 255 "
                f"{'counted as a miss' if self.undecided == 'miss' else 'ignored'}")


def protocol(con: Con, dataset_id: str, split: str, images: int, undecided: str = "miss") -> Protocol:
    """The ``Protocol`` of figures over ``images`` images of ``split`` of ``dataset_id``."""
    return Protocol(undecided, queries.mask_folder(con, dataset_id), split, int(images))


@dataclass(frozen=True)
class Undecided:
    """Undecided pixels per variant: pixels ``(V, C) int64`` of ground-truth class c labelled 255,
    known ``(V,) bool`` (False: the variant has no confusion rows, recorded before schema 8)."""

    pixels: np.ndarray
    known: np.ndarray


def undecided(con: Con, dataset_id: str, split: str, variant_ids: Sequence[str], num_classes: int,
              image_ids: Sequence[str] | None = None) -> Undecided:
    """The undecided pixels of ``variant_ids`` over the split's usable images (in ``image_ids``)."""
    index = {v: row for row, v in enumerate(variant_ids)}
    pixels = np.zeros((len(variant_ids), num_classes), np.int64)
    for r in queries.undecided_sums(con, dataset_id, split, image_ids):
        if r["variant_id"] in index:
            pixels[index[r["variant_id"]], r["class_id"]] = r["pixels"]
    known = set(queries.confused_variants(con, dataset_id))
    return Undecided(pixels=pixels, known=np.array([v in known for v in variant_ids], bool))


def apply_undecided(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, pixels: np.ndarray,
                    rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts ``(..., C)`` under an ``UNDECIDED`` rule and the coverage ``(...,)`` in [0, 1]: the
    share of ground-truth pixels (not 255) the label maps decide. "ignore" takes each class's
    undecided ``pixels`` (same shape) out of its FN; "miss" keeps the counts as stored."""
    if rule not in UNDECIDED:
        raise ValueError(f"unknown undecided rule {rule!r}; expected one of {list(UNDECIDED)}")
    truth = (tp + fn).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(truth > 0, 1.0 - pixels.sum(axis=-1) / np.maximum(truth, 1), np.nan)
    return (tp, fp, fn - pixels if rule == "ignore" else fn, coverage)


# --- threshold sweeps ---------------------------------------------------------------------


def background_counts(object_counts: np.ndarray, background_pixels: int, object_pixels: int) -> np.ndarray:
    """Background TP, FP, FN when every object class has its own threshold.

    object_counts: ``(C, 4) int64`` each object class's TP, FP, FN, fp_bg at its threshold (row 0
    unused); background_pixels, object_pixels: the ground truth's background and object pixels
    (not 255). Every ground-truth background pixel no class took is a background TP; every
    object pixel no class took is a background FP. Returns ``(3,) int64`` TP, FP, FN.
    """
    rows = np.asarray(object_counts, dtype=np.int64)[1:]
    taken_bg = int(rows[:, 3].sum())
    taken_objects = int((rows[:, 0] + rows[:, 1] - rows[:, 3]).sum())
    return np.array([background_pixels - taken_bg, object_pixels - taken_objects, taken_bg], np.int64)


def mean_iou(iou: np.ndarray, has_class: np.ndarray) -> np.ndarray:
    """Mean over the classes with images: ``iou (..., C)``, ``has_class (C,) bool`` -> ``(...,)``,
    NaN when no class has an image."""
    if not has_class.any():
        return np.full(iou.shape[:-1], np.nan)
    return np.nanmean(np.where(has_class, iou, np.nan), axis=-1)


@dataclass(frozen=True)
class SweepTable:
    """A variant's counts at every background threshold of its grid, over one set of images.

    thresholds: ``(J,) float64`` ascending; counts: ``(J, C, 4) int64`` TP, FP, FN, fp_bg per
    threshold and class (``engine.ops.sweep.sweep_counts`` summed); n_images: ``(C,) int64``
    images whose ground truth holds the class; background_pixels / object_pixels: ground-truth
    pixels (not 255) of background and of any object class.
    """

    variant_id: str
    classes: ClassSet
    thresholds: np.ndarray
    counts: np.ndarray
    n_images: np.ndarray
    background_pixels: int
    object_pixels: int

    @property
    def has_class(self) -> np.ndarray:
        return self.n_images > 0

    def metric(self, metric: str = "iou") -> np.ndarray:
        """``(J, C) float64`` of a ``METRICS`` figure, NaN where the class has no image."""
        c = self.counts
        values = metric_values(c[..., 0], c[..., 1], c[..., 2], metric)
        return np.where(self.has_class, values, np.nan)

    @property
    def miou(self) -> np.ndarray:
        """``(J,)`` mIoU over the classes with images at each threshold."""
        return mean_iou(self.metric("iou"), self.has_class)

    def at(self, indices: Sequence[int]) -> np.ndarray:
        """``(C, 3) int64`` TP, FP, FN with object class c at threshold ``indices[c]`` (entry 0,
        background, unused): objects read their own row, background is ``background_counts``."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.shape != (self.classes.num_classes,):
            raise ValueError(f"expected {self.classes.num_classes} threshold indices, got {indices.shape}")
        rows = self.counts[indices, np.arange(len(indices))]
        out = rows[:, :3].copy()
        out[0] = background_counts(rows, self.background_pixels, self.object_pixels)
        return out


def sweep_table(con: Con, dataset_id: str, split: str, variant_id: str,
                image_ids: Sequence[str] | None = None) -> SweepTable | None:
    """The ``SweepTable`` of ``variant_id`` over the split's usable images (in ``image_ids``);
    None when the variant has no sweep rows. Only the thresholds swept on every image are kept
    (a job resumed with another ``--sweep-grid`` swept the rest on some images only)."""
    rows = queries.sweep_sums(con, dataset_id, split, variant_id, image_ids)
    # Every ground-truth pixel of a swept image is a TP or FN of its class at each threshold, so
    # a threshold missing some image (it has valid pixels, or it would have no rows) sums fewer.
    truth: dict[float, int] = {}
    for r in rows:
        truth[r["threshold"]] = truth.get(r["threshold"], 0) + r["tp"] + r["fn"]
    most = max(truth.values(), default=0)
    rows = [r for r in rows if truth[r["threshold"]] == most]
    if not rows:
        return None
    classes = queries.get_dataset(con, dataset_id).classes
    thresholds = np.array(sorted({r["threshold"] for r in rows}), np.float64)
    at = {t: j for j, t in enumerate(thresholds.tolist())}
    counts = np.zeros((len(thresholds), classes.num_classes, 4), np.int64)
    n_images = np.zeros(classes.num_classes, np.int64)
    for r in rows:
        counts[at[r["threshold"]], r["class_id"]] = (r["tp"], r["fp"], r["fn"], r["fp_bg"])
        n_images[r["class_id"]] = max(n_images[r["class_id"]], r["n_images"])
    truth = counts[0, :, 0] + counts[0, :, 2]  # every ground-truth pixel is TP or FN of its class
    return SweepTable(variant_id=variant_id, classes=classes, thresholds=thresholds, counts=counts,
                      n_images=n_images, background_pixels=int(truth[0]), object_pixels=int(truth[1:].sum()))


def best_threshold(table: SweepTable) -> int:
    """The index of the grid threshold with the highest mIoU (the lowest threshold on ties)."""
    return int(np.nanargmax(np.nan_to_num(table.miou, nan=-1.0)))


def per_class_best(table: SweepTable) -> np.ndarray:
    """``(C,) int64``: for each object class the index of the threshold that maximises its own
    IoU (an object class's counts depend only on its own threshold). Ties keep ``best_threshold``
    (a class at 0 IoU everywhere does not move), then the lowest threshold; a class without
    images, and entry 0, take ``best_threshold``."""
    uniform = best_threshold(table)
    iou = np.nan_to_num(table.metric("iou"), nan=-1.0)
    best = np.argmax(iou, axis=0).astype(np.int64)
    keep = iou[uniform] >= iou.max(axis=0)
    best[keep | ~table.has_class] = uniform
    best[0] = uniform
    return best


@dataclass(frozen=True)
class TunedThresholds:
    """Thresholds chosen on the selection images, scored on both subsets.

    uniform: the index of the one best threshold on selection; per_class: ``(C,)`` indices
    (``per_class_best`` on selection); thresholds: ``(C,) float64`` their values;
    selection_iou / report_iou: ``(3, C) float64`` per-class IoU at (the default threshold
    ``default``, uniform, per class) on each subset; selection_miou / report_miou: ``(3,)``.
    """

    default: int
    uniform: int
    per_class: np.ndarray
    thresholds: np.ndarray
    selection_iou: np.ndarray
    report_iou: np.ndarray
    selection_miou: np.ndarray
    report_miou: np.ndarray


def _iou_rows(table: SweepTable, choices: Sequence[np.ndarray]) -> np.ndarray:
    rows = []
    for indices in choices:
        counts = table.at(indices)
        rows.append(np.where(table.has_class, metric_values(counts[:, 0], counts[:, 1], counts[:, 2], "iou"), np.nan))
    return np.array(rows)


def tune(selection: SweepTable, report: SweepTable, default_threshold: float) -> TunedThresholds:
    """Choose a uniform and a per-class threshold on ``selection`` and score them, with
    ``default_threshold`` (a grid value), on ``report``. Raises ``ValueError`` when the two
    tables have other grids or the default is not on the grid."""
    if not np.array_equal(selection.thresholds, report.thresholds):
        raise ValueError("selection and report sweeps have different threshold grids")
    matches = np.flatnonzero(np.isclose(selection.thresholds, default_threshold))
    if not len(matches):
        raise ValueError(f"threshold {default_threshold} is not on the grid {selection.thresholds.tolist()}")
    size = selection.classes.num_classes
    default, uniform = int(matches[0]), best_threshold(selection)
    per_class = per_class_best(selection)
    choices = [np.full(size, default), np.full(size, uniform), per_class]
    selection_iou, report_iou = _iou_rows(selection, choices), _iou_rows(report, choices)
    return TunedThresholds(
        default=default, uniform=uniform, per_class=per_class, thresholds=selection.thresholds[per_class],
        selection_iou=selection_iou, report_iou=report_iou,
        selection_miou=mean_iou(selection_iou, selection.has_class),
        report_miou=mean_iou(report_iou, report.has_class))


# --- the class confusion ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfusionMatrix:
    """Which ground-truth class a variant labelled as which, over one set of images.

    pixels: ``(C, C + 1) int64``, row = ground-truth class, column = predicted class, the last
    column undecided (255); GT 255 pixels are not counted. images: ``(C, C + 1) int64`` the
    images holding each cell. Per class c: TP = ``pixels[c, c]``, FN = the rest of row c, FP =
    the rest of column c (``counts``).
    """

    variant_id: str
    classes: ClassSet
    pixels: np.ndarray
    images: np.ndarray

    def normalised(self) -> np.ndarray:
        """``(C, C + 1) float64``: each row as shares of its ground-truth pixels (NaN for an empty row)."""
        total = self.pixels.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.pixels / np.maximum(total, 1), np.nan)

    def counts(self) -> np.ndarray:
        """``(C, 3) int64`` TP, FP, FN per class, as the ``counts`` rows sum (a predicted 255 is FN)."""
        square = self.pixels[:, :-1]
        tp = np.diag(square)
        return np.stack([tp, square.sum(axis=0) - tp, self.pixels.sum(axis=1) - tp], axis=1)

    def column_label(self, column: int) -> str:
        return "undecided (255)" if column == self.classes.num_classes else self.classes.names[column]


def confusion_matrix(con: Con, dataset_id: str, split: str, variant_id: str,
                     image_ids: Sequence[str] | None = None) -> ConfusionMatrix | None:
    """The ``ConfusionMatrix`` of ``variant_id`` over the split's usable images (in
    ``image_ids``); None when the variant has no confusion rows."""
    rows = queries.confusion_sums(con, dataset_id, split, variant_id, image_ids)
    if not rows and variant_id not in queries.confused_variants(con, dataset_id):
        return None
    classes = queries.get_dataset(con, dataset_id).classes
    size = classes.num_classes
    pixels = np.zeros((size, size + 1), np.int64)
    images = np.zeros((size, size + 1), np.int64)
    for r in rows:
        column = size if r["pred"] == IGNORE_INDEX else r["pred"]
        pixels[r["gt"], column], images[r["gt"], column] = r["pixels"], r["n_images"]
    return ConfusionMatrix(variant_id=variant_id, classes=classes, pixels=pixels, images=images)
