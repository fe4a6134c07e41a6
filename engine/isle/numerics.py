"""The ISLE class-wise ensemble as small pure functions: assignment, merge, prediction.

Ostrowski & Shafique, "ISLE: A Framework for Image Level Semantic Segmentation Ensemble", ISVC'23
(shared/papers/isle-class-wise-ensemble.md), Sec. 3:

- **Algorithm 2** (``auto_assignment``): for each object class, the candidate variant with the best
  per-class IoU over the selection images. Background is excluded ("the background is the inverse
  of all classes combined"): it is whatever no chosen class claims. A class set without
  background assigns every class, and a pixel no chosen class claims stays 255 (undecided).
- **Algorithm 3** (``merge_slices``): per image, the slice of class c is copied from the variant
  chosen for c. The paper concatenates slices; where two slices overlap the reference script adds
  the labels (turning them into a third class). Here an overlap is resolved by a documented,
  deterministic rule and counted per class pair (``OVERLAP_RULES``).
- **Naive ISLE** (Sec. 3, baseline; ``naive_choice``): the whole label map comes from the
  candidate that is best on the image's highest-ranked class, classes ranked by how many training
  images hold them (the paper ranks by instances; the cache knows images per class).

Label maps are ``(H, W) uint8`` label values of the dataset's class set (``ClassSet``) and 255
(ignore); C = its number of classes. A merged pseudo-label never holds a class absent from the
image's image-level labels: only those classes' slices are copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cache.classes import IGNORE_INDEX, ClassSet

OVERLAP_RULES = ("score", "precision")
"""How a pixel claimed by two chosen classes is decided.

``score`` (default): the class whose variant stored the higher score for it at that pixel (scores
upsampled bilinearly to the image); where a claimant's variant stored no scores (an imported PNG
folder) the ``precision`` rule decides that pixel. ``precision``: the class earlier in the
priority order, i.e. whose chosen variant has the higher per-class precision TP / (TP + FP) on the
selection images. Remaining ties go to the earlier class in the priority order.
"""

def absent_index(classes: ClassSet) -> int:
    """Row of the conflict matrix that counts pixels dropped because their class is not among the
    image's labels (``conflicts[absent, c]``): the background, which "wins" them, or C (one past
    the last class) for a class set without background, whose dropped pixels become 255."""
    return classes.background if classes.has_background else classes.num_classes


def conflict_shape(classes: ClassSet) -> tuple[int, int]:
    """``(C, C)``, or ``(C + 1, C + 1)`` without background (room for the absent row)."""
    n = classes.num_classes + (0 if classes.has_background else 1)
    return n, n


def unclaimed(classes: ClassSet) -> int:
    """The value of a pixel no chosen class claims: background, else 255 (undecided)."""
    return classes.background if classes.has_background else IGNORE_INDEX


# --- Algorithm 2: automatic assignment -------------------------------------------------------


@dataclass(frozen=True)
class AutoAssignment:
    """Algorithm 2's result over V candidates.

    choice: ``(C,) int64`` candidate row per class; ``choice[0] = -1`` when 0 is background (it
        is not assigned). A class without selection images gets the candidate with the best mIoU.
    tied: ``{class id: candidate rows}`` for classes whose best IoU several candidates share.
    no_images: class ids without any image in the selection subset.
    """

    choice: np.ndarray
    tied: dict[int, tuple[int, ...]]
    no_images: tuple[int, ...]


def auto_assignment(iou: np.ndarray, miou: np.ndarray, variant_ids: Sequence[str], classes: ClassSet) -> AutoAssignment:
    """The best candidate per object class (ISLE Algorithm 2).

    iou: ``(V, C) float`` per-class IoU over the selection images, NaN where no image holds the
        class. miou: ``(V,)``. variant_ids: V ids, used only to break ties.
    Ties (equal IoU) go to the higher mIoU, then the smaller variant id, so the choice does not
    depend on the order candidates were listed in. Raises ``ValueError`` for no candidate or
    mismatched shapes.
    """
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2 or iou.shape[0] == 0 or iou.shape[1] != classes.num_classes:
        raise ValueError(f"expected iou of shape (V >= 1, {classes.num_classes}), got {iou.shape}")
    if len(miou) != iou.shape[0] or len(variant_ids) != iou.shape[0]:
        raise ValueError(f"{iou.shape[0]} candidates but {len(miou)} mIoUs and {len(variant_ids)} ids")
    miou = np.nan_to_num(np.asarray(miou, dtype=np.float64), nan=-1.0)
    # Rows in tie-break order: higher mIoU first, then smaller id.
    order = sorted(range(len(variant_ids)), key=lambda v: (-miou[v], variant_ids[v]))
    choice = np.full(classes.num_classes, -1, np.int64)
    tied: dict[int, tuple[int, ...]] = {}
    no_images = []
    for c in classes.foreground:
        column = iou[:, c]
        if np.isnan(column).all():
            no_images.append(c)
            choice[c] = order[0]
            continue
        best = np.nanmax(column)
        winners = [v for v in order if column[v] == best]
        choice[c] = winners[0]
        if len(winners) > 1:
            tied[c] = tuple(winners)
    return AutoAssignment(choice=choice, tied=tied, no_images=tuple(no_images))


def precision_priority(tp: np.ndarray, fp: np.ndarray, choice: np.ndarray, classes: ClassSet) -> tuple[int, ...]:
    """Object classes ordered by the precision of their chosen variant, highest first.

    tp, fp: ``(V, C)`` pixel counts over the selection images; choice: ``(C,)`` candidate row per
    class (background ignored). A class with no predicted pixel has precision 0. Ties go to the
    smaller class id. Returns every object class id (``classes.foreground``) once.
    """
    precision = {}
    for c in classes.foreground:
        t, f = tp[choice[c], c], fp[choice[c], c]
        precision[c] = t / (t + f) if t + f > 0 else 0.0
    return tuple(sorted(precision, key=lambda c: (-precision[c], c)))


# --- predicted figures, from the counts alone ------------------------------------------------


def predicted_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, choice: np.ndarray,
                     classes: ClassSet) -> np.ndarray:
    """The ensemble's TP, FP, FN per class as predicted from the candidates' cached counts.

    tp, fp, fn: ``(V, C) int`` summed over the same images for every candidate (each candidate
    labelled all of them); choice: ``(C,)`` candidate row per object class.
    Returns ``(C, 3) int64``.

    Object class c: the counts of its chosen variant, exact but for the pixels c loses to another
    class in an overlap (``merge_slices`` counts them), which move from TP to FN or leave FP.
    Background (never assigned): its ground-truth pixels G0 are any candidate's TP0 + FN0; the
    chosen classes' false positives are taken to lie on background (FN0 = sum FP_c, capped at G0)
    and their misses to become background (FP0 = sum FN_c). That is exact for images with one
    object class and no overlap; on multi-class images part of FP_c lies on another class.
    Without background every class is an object class and nothing is estimated.
    """
    tp, fp, fn = (np.asarray(a, dtype=np.int64) for a in (tp, fp, fn))
    out = np.zeros((classes.num_classes, 3), np.int64)
    objects = np.asarray(classes.foreground)
    rows = np.asarray(choice)[objects]
    out[objects, 0], out[objects, 1], out[objects, 2] = tp[rows, objects], fp[rows, objects], fn[rows, objects]
    if not classes.has_background:
        return out
    g0 = tp[rows[0], 0] + fn[rows[0], 0]
    fn0 = min(int(out[objects, 1].sum()), int(g0))
    out[0] = (g0 - fn0, out[objects, 2].sum(), fn0)
    return out


def iou_of(counts: np.ndarray, has_images: np.ndarray) -> tuple[np.ndarray, float]:
    """``counts: (C, 3)`` TP, FP, FN -> ``((C,) IoU, NaN where has_images is False; mIoU)``."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    iou = np.where(has_images, tp / np.maximum(tp + fp + fn, 1), np.nan)
    return iou, float(np.nanmean(iou)) if has_images.any() else float("nan")


# --- Algorithm 3: exact merge of one image ---------------------------------------------------


def merge_slices(
    claims: Mapping[int, np.ndarray],
    image_labels: Sequence[int],
    priority: Sequence[int],
    rule: str = "score",
    score_of: Callable[[int], np.ndarray | None] | None = None,
    *,
    classes: ClassSet,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's ensemble pseudo-label (ISLE Algorithm 3) and its overlaps.

    claims: ``{class id: (H, W) bool}``, the slice of class c in the label map of the variant
        chosen for c (``label == c``); classes not in ``image_labels`` are dropped (counted in
        ``conflicts[absent_index(classes), c]``).
    image_labels: the image-level object classes.
    priority: class ids in precedence order (``precision_priority``); classes not listed come last,
        by id.
    rule: one of ``OVERLAP_RULES``. score_of: ``score_of(c) -> (H, W) float32`` or None, the
        score of class c in its chosen variant at the image size; called only for classes that
        overlap another, only with rule "score".
    classes: the dataset's class set.
    Returns ``(label (H, W) uint8, conflicts conflict_shape(classes) int64)``: pixels claimed by
    no class are ``unclaimed(classes)`` (background, else 255); ``conflicts[w, l]`` counts the
    pixels class w won from class l.
    Raises ``ValueError`` for an unknown rule or claims of different shapes.
    """
    if rule not in OVERLAP_RULES:
        raise ValueError(f"overlap rule must be one of {OVERLAP_RULES}, got {rule!r}")
    shapes = {np.shape(m) for m in claims.values()}
    if len(shapes) > 1:
        raise ValueError(f"class slices of different shapes {sorted(shapes)}")
    conflicts = np.zeros(conflict_shape(classes), np.int64)
    absent = absent_index(classes)
    if not claims:
        raise ValueError("no class slice to merge: at least one claim map is needed for the image size")
    shape = shapes.pop()
    rank = {c: i for i, c in enumerate(priority)}
    present = set(int(c) for c in image_labels)
    kept = []
    for c in sorted(claims, key=lambda c: (rank.get(c, len(rank) + c), c)):
        if c in present:
            kept.append(c)
        else:
            conflicts[absent, c] += int(np.count_nonzero(claims[c]))
    label = np.full(shape, unclaimed(classes), np.uint8)
    if not kept:
        return label, conflicts
    # Painted from the lowest priority up, each pixel ends with its highest-priority claimant;
    # only the overlap pixels need more (their claimants as a small (k, n) array).
    n_claims = np.zeros(shape, np.uint8)
    for c in reversed(kept):
        claim = np.asarray(claims[c], dtype=bool)
        label[claim] = c
        n_claims += claim
    overlap = n_claims > 1
    if not overlap.any():
        return label, conflicts
    where = np.stack([np.asarray(claims[c], dtype=bool)[overlap] for c in kept])  # (k, n), priority order
    # argmax returns the first True, i.e. the highest-priority claimant.
    winner = np.argmax(where, axis=0)
    if rule == "score" and score_of is not None:
        involved = np.flatnonzero(where.sum(axis=1) > 0)
        keys = np.full(where.shape, -np.inf, np.float32)
        missing = np.zeros(where.shape[1], bool)
        for k in involved:
            score = score_of(kept[k])
            if score is None:
                missing |= where[k]
            else:
                keys[k] = np.where(where[k], np.asarray(score, np.float32)[overlap], -np.inf)
        # np.argmax takes the first maximum: an equal score goes to the higher priority.
        by_score = np.argmax(keys, axis=0)
        winner = np.where(missing, winner, by_score)
    label[overlap] = np.asarray(kept, np.uint8)[winner]
    for k, w in enumerate(kept):
        won = where[:, winner == k]  # claimants of the pixels class w won
        for j, loser in enumerate(kept):
            if j != k:
                conflicts[w, loser] += int(np.count_nonzero(won[j]))
    return label, conflicts


# --- naive ISLE ------------------------------------------------------------------------------


def naive_choice(image_labels: Sequence[int], ranking: Sequence[int], best_for_class: Mapping[int, str],
                 fallback: str) -> str:
    """The variant whose whole label map naive ISLE takes for one image (ISLE Sec. 3).

    ranking: class ids, most frequent first; best_for_class: ``{class id: variant id}`` from
    Algorithm 2; fallback: the variant for an image without object classes (best mIoU).
    """
    labels = set(int(c) for c in image_labels)
    for c in ranking:
        if c in labels and c in best_for_class:
            return best_for_class[c]
    return fallback


def drop_absent(label: np.ndarray, image_labels: Sequence[int], classes: ClassSet) -> tuple[np.ndarray, np.ndarray]:
    """``label (H, W) uint8`` with object classes not in ``image_labels`` set to
    ``unclaimed(classes)`` (background, else 255).

    Returns ``(label, dropped (C,) int64 pixels per class)``; 255 stays 255.
    """
    keep = np.zeros(256, bool)
    keep[[IGNORE_INDEX, *image_labels]] = True
    if classes.has_background:
        keep[classes.background] = True
    drop = ~keep[label]
    dropped = np.bincount(label[drop], minlength=256)[: classes.num_classes].astype(np.int64)
    out = label.copy()
    out[drop] = unclaimed(classes)
    return out, dropped


# --- selection and report subsets ------------------------------------------------------------


@dataclass(frozen=True)
class Subset:
    """Which images of the split decide the assignment (selection) and which report on it.

    fraction = 1 (default, as in the paper): every image selects, and the report subset is empty.
    fraction < 1: an image selects when the SHA-1 of ``"{seed}:{image id}"`` falls below the
    fraction; the rest is the report subset, so its IoU shows how much of the gain is selection
    bias. The split is stable across runs and machines (no RNG state).
    exclude: image ids kept out of both (e.g. flagged images).
    """

    fraction: float = 1.0
    seed: int = 0
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"selection fraction must be in (0, 1], got {self.fraction}")

    def split(self, image_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(selection ids, report ids)`` of ``image_ids``, each in input order."""
        excluded = set(self.exclude)
        selection, report = [], []
        for image_id in image_ids:
            if image_id in excluded:
                continue
            digest = hashlib.sha1(f"{self.seed}:{image_id}".encode()).digest()
            (selection if int.from_bytes(digest[:8], "big") < self.fraction * 2**64 else report).append(image_id)
        return selection, report
