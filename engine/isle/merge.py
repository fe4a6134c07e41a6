"""The ISLE ensemble as a variant (ensembles ``isle`` and ``isle-naive``): the exact merge of chosen
class slices, and naive ISLE.

ISLE (Ostrowski & Shafique, ISVC'23; shared/papers/isle-class-wise-ensemble.md) Sec. 3,
Algorithm 3: for every image, the slice of each object class is copied from the variant chosen for
that class (``numerics.merge_slices``: overlaps decided by ``rule``, counted per class
pair; classes absent from the image's labels dropped; unclaimed pixels background). The
``isle-naive`` plugin is the paper's naive baseline: the whole label map of the candidate that is
best on the image's most frequent class.

Both start a chain and read other variants' label maps through ``RunContext.variants``; they
train nothing. The result is an ordinary variant: label maps, counts
and (for the merge) per-image conflict counts in the cache, so its exact per-class IoU, its rows in
the heatmap and its export come from the same machinery as any method's. Images stream through
``ctx.processes`` worker processes (``engine.ops.pool.run_jobs``), a few at a time, so memory does not
grow with the number of images.

Cost, measured on the bundled train split: see ``bench/ensemble_merge.py`` and the README.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cache.labelmaps import LabelMapError, read_label_map, read_scores
from cache.classes import ClassSet
from engine.core.registry import Offer, Role, register
from engine.core.types import ImageError, LabelResult, RunContext, SourceVariant
from engine.ops.pool import run_jobs

from .numerics import OVERLAP_RULES, absent_index, conflict_shape, drop_absent, merge_slices, naive_choice, unclaimed


def _check_variants(variants: tuple[str, ...], order: tuple[int, ...], what: str) -> None:
    """Shape checks that need no class set: one non-empty id per class, ``order`` a permutation."""
    if not variants or not all(isinstance(v, str) and v for v in variants):
        raise ValueError(f"isle: variants must list one variant id per object class, got {list(variants)}")
    if len(order) != len(variants) or len(set(order)) != len(order):
        raise ValueError(f"isle: {what} must order the {len(variants)} object class ids once each, got {list(order)}")


def check_classes(variants: tuple[str, ...], order: tuple[int, ...], what: str, classes: ClassSet) -> None:
    """Raise ``ValueError`` unless there is one variant per object class of ``classes`` and
    ``order`` holds each object class id once (checked when the job runs on its dataset)."""
    if len(variants) != len(classes.foreground) or sorted(order) != list(classes.foreground):
        raise ValueError(f"isle: the dataset has {len(classes.foreground)} object classes; the assignment lists "
                         f"{len(variants)} variants and {what} {list(order)}")


@dataclass(frozen=True)
class IsleConfig:
    """An assignment (Algorithm 2's output, possibly overridden) and the overlap rule.

    variants: one variant id per object class, in ``ClassSet.foreground`` order.
    rule: ``numerics.OVERLAP_RULES``. priority: object class ids in precedence order for
    the "precision" rule and for ties (highest precision of the chosen variant first).
    Nothing is trained: the cost is reading the chosen label maps (and, for overlap pixels, their
    scores).
    """

    variants: tuple[str, ...] = ()
    rule: str = "score"
    priority: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_variants(self.variants, self.priority, "priority")
        if self.rule not in OVERLAP_RULES:
            raise ValueError(f"isle: rule must be one of {OVERLAP_RULES}, got {self.rule!r}")


@dataclass(frozen=True)
class NaiveIsleConfig:
    """Naive ISLE: variants as ``IsleConfig`` (best per class); ranking: class ids, most images
    first; fallback: the variant for an image without object classes (best mIoU)."""

    variants: tuple[str, ...] = ()
    ranking: tuple[int, ...] = ()
    fallback: str = ""

    def __post_init__(self) -> None:
        _check_variants(self.variants, self.ranking, "ranking")
        if not self.fallback:
            raise ValueError("isle-naive: fallback variant id is empty")


@dataclass(frozen=True)
class _MergeJob:
    """One image: its labels and size, and per present class the chosen variant's files."""

    image_id: str
    labels: tuple[int, ...]
    size: tuple[int, int]  # (H, W)
    files: tuple[tuple[int, Path, Path | None], ...]  # (class id, label map, scores or None)


def _read_label(path: Path, size: tuple[int, int], image_id: str) -> np.ndarray:
    label = read_label_map(path)
    if label.shape != size:
        raise ImageError(f"{path}: label map is {label.shape[1]}x{label.shape[0]} (WxH) but image "
                         f"{image_id} is {size[1]}x{size[0]}")
    return label


def _class_score(path: Path | None, class_id: int, size: tuple[int, int]) -> np.ndarray | None:
    """Class ``class_id``'s stored score ``(H, W) float32`` (bilinear to ``size``), or None when
    the variant kept no scores or none for that class."""
    if path is None:
        return None
    classes, scores = read_scores(path)
    if class_id not in classes:
        return None
    channel = scores[classes.index(class_id)]
    return np.asarray(Image.fromarray(channel, mode="F").resize(size[::-1], Image.BILINEAR))


def _merge(job: _MergeJob, rule: str, priority: tuple[int, ...], classes: ClassSet) -> LabelResult:
    """One image's merged label and conflicts; a bad file is an error result naming it."""
    try:
        maps: dict[Path, np.ndarray] = {}
        claims, score_files = {}, {}
        for class_id, label_path, scores_path in job.files:
            if label_path not in maps:
                maps[label_path] = _read_label(label_path, job.size, job.image_id)
            claims[class_id] = maps[label_path] == class_id
            score_files[class_id] = scores_path
        if not claims:  # no object class in the image: all background (undecided without one)
            return LabelResult(job.image_id, label=np.full(job.size, unclaimed(classes), np.uint8),
                               conflicts=np.zeros(conflict_shape(classes), np.int64))
        label, conflicts = merge_slices(claims, job.labels, priority, rule,
                                        lambda c: _class_score(score_files[c], c, job.size), classes=classes)
    except (LabelMapError, ImageError, OSError, ValueError, KeyError) as exc:
        return LabelResult(job.image_id, error=str(exc))
    return LabelResult(job.image_id, label=label, conflicts=conflicts)


def _open(ctx: RunContext, variant_ids: set[str]) -> dict[str, SourceVariant]:
    if ctx.variants is None:
        raise ValueError("isle reads other variants: the run needs ctx.variants")
    return {v: ctx.variants(v) for v in sorted(variant_ids)}


def _files(variant: SourceVariant, image_id: str) -> tuple[Path, Path | None] | LabelResult:
    try:
        return variant.files(image_id)
    except ImageError as exc:
        return LabelResult(image_id, error=str(exc))


def merge_jobs(cfg: IsleConfig, ctx: RunContext) -> Iterator[_MergeJob | LabelResult]:
    """The per-image jobs of ``ctx.todo``: only the image's own classes are read (no-absent rule)."""
    check_classes(cfg.variants, cfg.priority, "priority", ctx.classes)
    chosen = dict(zip(ctx.classes.foreground, cfg.variants))
    readers = _open(ctx, set(cfg.variants))
    for item in ctx.todo:
        files = []
        for class_id in item.labels:
            found = _files(readers[chosen[class_id]], item.image_id)
            if isinstance(found, LabelResult):
                files = found
                break
            files.append((class_id, *found))
        yield files if isinstance(files, LabelResult) else _MergeJob(
            item.image_id, tuple(item.labels), (item.height, item.width), tuple(files))


@register("isle", role=Role.ENSEMBLE, config=IsleConfig, title="ISLE", offers={Offer.ISLE})
def run(cfg: IsleConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """The exact ISLE merge of every ``ctx.todo`` image (Algorithm 3)."""
    yield from run_jobs(_merge, merge_jobs(cfg, ctx), ctx, cfg.rule, cfg.priority, ctx.classes)


def _naive(job: _MergeJob, classes: ClassSet) -> LabelResult:
    """One image's naive-ISLE label: the chosen variant's map with absent classes dropped."""
    (_, label_path, _), = job.files
    try:
        label, dropped = drop_absent(_read_label(label_path, job.size, job.image_id), job.labels, classes)
    except (LabelMapError, ImageError, OSError) as exc:
        return LabelResult(job.image_id, error=str(exc))
    conflicts = np.zeros(conflict_shape(classes), np.int64)
    conflicts[absent_index(classes), : classes.num_classes] = dropped  # pixels of absent classes
    return LabelResult(job.image_id, label=label, conflicts=conflicts)


@register("isle-naive", role=Role.ENSEMBLE, config=NaiveIsleConfig, title="naive ISLE", offers={Offer.ISLE})
def run_naive(cfg: NaiveIsleConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Naive ISLE (Sec. 3): per image, the whole map of the best candidate on its top-ranked class."""
    check_classes(cfg.variants, cfg.ranking, "ranking", ctx.classes)
    best = dict(zip(ctx.classes.foreground, cfg.variants))
    readers = _open(ctx, {*cfg.variants, cfg.fallback})

    def jobs() -> Iterator[_MergeJob | LabelResult]:
        for item in ctx.todo:
            variant = naive_choice(item.labels, cfg.ranking, best, cfg.fallback)
            found = _files(readers[variant], item.image_id)
            yield found if isinstance(found, LabelResult) else _MergeJob(
                item.image_id, tuple(item.labels), (item.height, item.width), ((0, *found),))

    yield from run_jobs(_naive, jobs(), ctx, ctx.classes)
