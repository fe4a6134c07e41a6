"""How much of ISLE's gain survives on images that did not choose it: k-fold cross-validation,
an image-level bootstrap of each class's choice, the stable assignment rule and the
labelled-budget curve, as small pure functions over per-image counts (no label map decoded).

ISLE's Algorithm 2 (Ostrowski & Shafique, ISVC'23, Sec. 3; ``numerics.auto_assignment``) picks
each class's candidate with the ground truth of the same images it reports on; a class held by
few images is then won by chance. These functions re-run Algorithm 2 on images drawn from the
selection subset and score it on others:

- **Cross-validation** (``cross_validate``): the images in k folds (``folds``); the rule chooses
  on k-1 folds and the held-out fold is scored, for ISLE and for the best single candidate chosen
  on the same k-1 folds (Hastie et al., *Elements of Statistical Learning*, Sec. 7.10).
- **Bootstrap** (``confidence``): images resampled with replacement (Efron & Tibshirani,
  *An Introduction to the Bootstrap*, Ch. 13, percentile interval); per class, the IoU gain of the
  chosen candidate over every other one, its interval and the share of resamples it wins.
- **Stable rule** (``stable_choice``): a class leaves the best single candidate (best mIoU on the
  selection images) only when the lower end of its bootstrap interval for that gain is above a
  margin; margin = -inf is Algorithm 2.
- **Budget curve** (``budget_curve``): Algorithm 2, the stable rule and the best single chosen on
  n images drawn from a pool, each scored on a fixed report subset.

Counts are ``(N, V, C, 3) int64`` TP, FP, FN per image, candidate and class (``cache.reports.
ImageCounts``); a class is *present* in an image when TP + FN > 0 (its ground truth holds it). An
ensemble's figures on a set of images are ``numerics.predicted_counts`` of the candidates' sums
there (background estimated as on the ISLE page); a single candidate's are its own sums.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cache.classes import ClassSet

from .numerics import auto_assignment, iou_of, predicted_counts

SURE, LIKELY = 0.95, 0.75
"""A chosen candidate that wins at least SURE of the resamples against every other candidate is
"sure", at least LIKELY "likely"; below LIKELY its choice is a "coin flip"."""

BUDGET_SIZES = (10, 25, 50, 100, 200, 400, None)  # None: every image of the pool


# --- sums and figures ------------------------------------------------------------------------


def present(counts: np.ndarray) -> np.ndarray:
    """``(N, C) bool``: the ground truth of image n holds class c (TP + FN > 0; TP + FN are the
    class's ground-truth pixels, the same for every candidate, so the first one's are read)."""
    return (counts[:, 0, :, 0] + counts[:, 0, :, 2]) > 0


def figures(sums: np.ndarray, n_present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and mIoU of every candidate from summed counts.

    sums: ``(..., V, C, 3)``; n_present: ``(..., C)`` images (with multiplicity) holding the class.
    Returns ``iou (..., V, C)`` float64 in [0, 1], NaN where no image holds the class, and
    ``miou (..., V)``, NaN where no class has an image.
    """
    tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
    held = np.broadcast_to(n_present[..., None, :] > 0, tp.shape)
    iou = np.where(held, tp / np.maximum(tp + fp + fn, 1), np.nan)
    with np.errstate(invalid="ignore"):
        miou = np.where(held.any(axis=-1), np.nansum(iou, axis=-1) / np.maximum(held.sum(axis=-1), 1), np.nan)
    return iou, miou


def best_single(miou: np.ndarray, variant_ids: Sequence[str]) -> int:
    """The candidate row with the best mIoU, ties to the smaller variant id (Algorithm 2's order)."""
    miou = np.nan_to_num(np.asarray(miou, np.float64), nan=-1.0)
    return min(range(len(variant_ids)), key=lambda v: (-miou[v], variant_ids[v]))


def ensemble_miou(sums: np.ndarray, n_present: np.ndarray, choice: np.ndarray, classes: ClassSet) -> float:
    """mIoU of the ensemble ``choice`` (``(C,)`` candidate row per object class) predicted from the
    candidates' summed counts ``(V, C, 3)`` over images holding each class ``n_present (C,)``."""
    counts = predicted_counts(sums[..., 0], sums[..., 1], sums[..., 2], choice, classes)
    return iou_of(counts, n_present > 0)[1]


# --- rules -----------------------------------------------------------------------------------


Rule = Callable[[np.ndarray], np.ndarray]
"""A rule maps counts ``(N, V, C, 3)`` of the images it may look at to a choice ``(C,) int64``."""


def algorithm2(variant_ids: Sequence[str], classes: ClassSet) -> Rule:
    """ISLE Algorithm 2 (``numerics.auto_assignment``) as a rule."""

    def choose(counts: np.ndarray) -> np.ndarray:
        iou, miou = figures(counts.sum(axis=0), present(counts).sum(axis=0))
        return auto_assignment(iou, miou, variant_ids, classes).choice

    return choose


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n) float64``: how often each of n images is drawn in each resample of n
    images with replacement (seeded ``numpy.random.default_rng``)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs images and resamples, got {n} images and {resamples} resamples")
    rng = np.random.default_rng(seed)
    weights = np.empty((resamples, n), np.float64)
    step = 100  # resamples drawn at once: few calls, and no (B, N) index array beside the result
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
        weights[start:start + rows] = np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n)
    return weights


def resampled_iou(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(B, V, C)`` per-class IoU of every candidate in every resample; ``weights (B, N)`` from
    ``bootstrap_weights``. One matrix product: sums of a resample are its weights times the counts."""
    n, v, c, _ = counts.shape
    sums = (weights @ counts.reshape(n, v * c * 3).astype(np.float64)).reshape(-1, v, c, 3)
    return figures(sums, weights @ present(counts).astype(np.float64))[0]


@dataclass(frozen=True)
class Confidence:
    """The bootstrap of one assignment over its images; rows C, columns the V candidates.

    low, high: ``(C, V)`` percentile interval of IoU(chosen) - IoU(other) per class, in IoU units
    ([-1, 1]); share: ``(C, V)`` share of resamples in which the chosen candidate's IoU is higher.
    NaN in the chosen candidate's own column, for the background when it is not assigned, and where
    no resample holds the class. resamples, level: B and the interval's coverage.
    """

    choice: np.ndarray
    low: np.ndarray
    high: np.ndarray
    share: np.ndarray
    resamples: int
    level: float

    def rival(self, class_id: int) -> int | None:
        """The candidate the choice of ``class_id`` beats least often, None when there is none."""
        shares = self.share[class_id]
        return None if np.isnan(shares).all() else int(np.nanargmin(shares))

    def verdict(self, class_id: int) -> str:
        """"sure", "likely" or "coin flip" by the share against the rival ("only candidate"
        when nothing competes, "no images" when no resample holds the class, "tied" when the
        rival's IoU equals the chosen one's in every resample, e.g. both 0)."""
        if self.share.shape[1] == 1:
            return "only candidate"
        rival = self.rival(class_id)
        if rival is None:
            return "no images"
        if self.low[class_id, rival] == self.high[class_id, rival] == 0.0:
            return "tied"
        share = self.share[class_id, rival]
        return "sure" if share >= SURE else "likely" if share >= LIKELY else "coin flip"


def confidence(iou: np.ndarray, choice: np.ndarray, classes: ClassSet, level: float = 0.95) -> Confidence:
    """Per-class confidence of ``choice`` from resampled IoU ``(B, V, C)`` (``resampled_iou``).

    Raises ``ValueError`` for a level outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"the interval's level must be in (0, 1), got {level}")
    b, v, c = iou.shape
    low, high, share = (np.full((c, v), np.nan) for _ in range(3))
    for k in classes.foreground:
        own = iou[:, choice[k], k]
        held = ~np.isnan(own)  # a resample holding the class gives every candidate an IoU for it
        if not held.any():
            continue
        gain = own[held, None] - iou[held, :, k]
        low[k], high[k] = np.percentile(gain, [50 * (1 - level), 50 * (1 + level)], axis=0)
        share[k] = np.mean(gain > 0, axis=0)
        low[k, choice[k]] = high[k, choice[k]] = share[k, choice[k]] = np.nan
    return Confidence(choice=np.asarray(choice), low=low, high=high, share=share, resamples=b, level=level)


def stable_choice(auto: np.ndarray, best: int, low: np.ndarray, classes: ClassSet, margin: float) -> np.ndarray:
    """The stable rule: class c keeps Algorithm 2's ``auto[c]`` only when the lower end of the
    interval of its gain over the best single candidate ``best``, ``low[c, best]`` (``Confidence.
    low``), is above ``margin`` (IoU units); otherwise it takes ``best``. margin = -inf returns
    ``auto`` (Algorithm 2). Returns ``(C,) int64`` (background -1 as in ``auto``)."""
    choice = np.asarray(auto, np.int64).copy()
    if margin == -np.inf:
        return choice
    for c in classes.foreground:
        if choice[c] != best and not low[c, best] > margin:  # NaN (no resample holds c) keeps best
            choice[c] = best
    return choice


def stable(variant_ids: Sequence[str], classes: ClassSet, margin: float = 0.0, resamples: int = 1000,
           level: float = 0.95, seed: int = 0) -> Rule:
    """The stable rule (``stable_choice``) with its own bootstrap of the images it is given."""
    pick = algorithm2(variant_ids, classes)

    def choose(counts: np.ndarray) -> np.ndarray:
        auto = pick(counts)
        best = best_single(figures(counts.sum(axis=0), present(counts).sum(axis=0))[1], variant_ids)
        moved = np.array([c for c in classes.foreground if auto[c] != best], np.int64)
        if margin == -np.inf or not len(moved):
            return auto
        # Only the gains of the classes Algorithm 2 moves, over the best single, are resampled:
        # (N, 2, M, 3) counts of (chosen, best) per moved class, a fraction of all V x C.
        pair = np.stack([counts[:, auto[moved], moved], counts[:, np.full_like(moved, best), moved]], axis=1)
        iou = resampled_iou(pair, bootstrap_weights(len(counts), resamples, seed))
        low = np.full((classes.num_classes, len(variant_ids)), np.nan)
        for m, c in enumerate(moved):
            gain = iou[:, 0, m] - iou[:, 1, m]
            held = ~np.isnan(gain)
            if held.any():
                low[c, best] = np.percentile(gain[held], 50 * (1 - level))
        return stable_choice(auto, best, low, classes, margin)

    return choose


# --- cross-validation ------------------------------------------------------------------------


def folds(image_ids: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """``(N,) int64`` fold of each image: images ordered by the SHA-1 of ``"{seed}:{image id}"``,
    dealt round-robin into k folds (sizes differ by at most one; the same on every machine and in
    any input order). Raises ``ValueError`` unless 2 <= k <= N."""
    if not 2 <= k <= len(image_ids):
        raise ValueError(f"cross-validation needs 2 <= k <= {len(image_ids)} images, got k = {k}")
    order = sorted(range(len(image_ids)), key=lambda i: hashlib.sha1(f"{seed}:{image_ids[i]}".encode()).digest())
    fold = np.empty(len(image_ids), np.int64)
    fold[order] = np.arange(len(image_ids)) % k
    return fold


@dataclass(frozen=True)
class CrossValidation:
    """A rule and the best single candidate chosen on k-1 folds, scored on the held-out fold.

    isle, single: ``(k,)`` held-out mIoU in [0, 1]; gain = isle - single; choices: ``(k, C)``
    each fold's choice; singles: ``(k,)`` the best single candidate's row per fold.
    """

    isle: np.ndarray
    single: np.ndarray
    choices: np.ndarray
    singles: np.ndarray

    @property
    def gain(self) -> np.ndarray:
        return self.isle - self.single

    @property
    def k(self) -> int:
        return len(self.isle)


def cross_validate(counts: np.ndarray, fold: np.ndarray, rule: Rule, variant_ids: Sequence[str],
                   classes: ClassSet) -> CrossValidation:
    """``rule`` and the best single candidate chosen on every fold but one and scored on it, for
    each of the folds in ``fold`` (``folds``)."""
    k = int(fold.max()) + 1
    isle, single, choices, singles = np.zeros(k), np.zeros(k), [], []
    for f in range(k):
        train, test = counts[fold != f], counts[fold == f]
        choice = rule(train)
        best = best_single(figures(train.sum(axis=0), present(train).sum(axis=0))[1], variant_ids)
        sums, held = test.sum(axis=0), present(test).sum(axis=0)
        isle[f] = ensemble_miou(sums, held, choice, classes)
        single[f] = figures(sums, held)[1][best]
        choices.append(choice)
        singles.append(best)
    return CrossValidation(isle=isle, single=single, choices=np.array(choices), singles=np.array(singles))


# --- labelled-budget curve -------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetCurve:
    """Report-subset mIoU against the number of labelled selection images.

    sizes: ``(S,)`` images drawn (the last may be the whole pool); miou: ``{rule name: (S, D)}``
    report mIoU in [0, 1] per size and draw, with "best single" among the rules; draws: D.
    """

    sizes: np.ndarray
    miou: dict[str, np.ndarray]
    draws: int


def budget_curve(pool: np.ndarray, report: np.ndarray, rules: dict[str, Rule], variant_ids: Sequence[str],
                 classes: ClassSet, sizes: Sequence[int | None] = BUDGET_SIZES, draws: int = 20,
                 seed: int = 0) -> BudgetCurve:
    """Each rule in ``rules`` and the best single candidate, chosen on ``n`` images drawn without
    replacement from ``pool`` (counts ``(P, V, C, 3)``) and scored on ``report`` (counts of the
    report images), for every n of ``sizes`` (None or n >= P: the whole pool, drawn once and
    repeated) and ``draws`` seeded draws. Raises ``ValueError`` for an empty pool or report."""
    if len(pool) == 0 or len(report) == 0:
        raise ValueError(f"a budget curve needs selection and report images, got {len(pool)} and {len(report)}")
    sums, held = report.sum(axis=0), present(report).sum(axis=0)
    single_report = figures(sums, held)[1]
    rng = np.random.default_rng(seed)
    ns = sorted({min(n or len(pool), len(pool)) for n in sizes})
    out = {name: np.zeros((len(ns), draws)) for name in (*rules, "best single")}
    for s, n in enumerate(ns):
        for d in range(draws if n < len(pool) else 1):
            drawn = pool[rng.choice(len(pool), size=n, replace=False)] if n < len(pool) else pool
            for name, rule in rules.items():
                out[name][s, d] = ensemble_miou(sums, held, rule(drawn), classes)
            best = best_single(figures(drawn.sum(axis=0), present(drawn).sum(axis=0))[1], variant_ids)
            out["best single"][s, d] = single_report[best]
        if n >= len(pool):
            for values in out.values():
                values[s, :] = values[s, 0]
    return BudgetCurve(sizes=np.array(ns), miou=out, draws=draws)
