"""What flows between the worker and the method/refinement plugins.

A plugin turns a ``RunContext`` into a stream of ``LabelResult``s, one per image of
``ctx.todo``; the worker writes each result to the cache as it arrives, so a killed job loses at
most the image in flight.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache.classes import ClassSet


class Cancelled(Exception):
    """Raised by ``RunContext.report`` when the user cancelled the job."""


class ImageError(Exception):
    """A bad input file; the message names the file and the problem."""


@dataclass(frozen=True)
class Item:
    """One image of a dataset split, as registered in the cache.

    ``labels`` are the image-level object class ids (label values of the dataset's class set),
    from the mask or the dataset's label file. ``mask_path`` is the ground truth (None: the image
    has none): WSSS methods must only use ``labels``; it is here for evaluation and for modes
    explicitly marked as oracle.
    """

    image_id: str
    image_path: Path
    mask_path: Path | None
    labels: tuple[int, ...]
    height: int
    width: int


@dataclass
class LabelResult:
    """A pseudo-label for one image, or the reason there is none.

    label: ``(H, W) uint8``, label values of the class set or 255 (ignore), H and W the image size.
    scores: ``(K, h, w) float16/float32 in [0, 1]``, the per-class scores the label was derived
        from (any resolution; stored as float16). Channel k belongs to class ``score_classes[k]``;
        class 0 is the background score (for a class set with background).
    error: set instead of ``label`` when the image could not be processed (bad input).
    conflicts: ``(C, C) int64`` for a merge (ISLE), C = the number of classes: pixels class w
        won from class l at ``[w, l]``; row 0 counts pixels of classes absent from the image's
        labels (dropped).
    peak: for a label made by a constant background threshold (a plugin registered with
        ``threshold_sweep``): ``((H, W) float32 best object score, (H, W) uint8 its class)`` at
        full resolution, from which the worker records the threshold sweep
        (``engine.ops.sweep``).
    recorded: set instead of the arrays once ``RunContext.finish`` wrote the files and counted
        the rows (in a pool process); the worker then only records the rows.
    """

    image_id: str
    label: np.ndarray | None = None
    scores: np.ndarray | None = None
    score_classes: tuple[int, ...] = ()
    error: str | None = None
    conflicts: np.ndarray | None = None
    peak: tuple[np.ndarray, np.ndarray] | None = None
    recorded: Recorded | None = None


@dataclass(frozen=True)
class Recorded:
    """One image's result as the worker records it: its files, written, and its rows, counted
    (``engine.runtime.recording.Recorder``).

    label_path, scores_path: relative to the cache folder (scores_path None without scores).
    counts: ``(class, tp, fp, fn)``; confusion: ``(gt, pred, pixels)``; sweep:
    ``(threshold, class, tp, fp, fn, fp_bg)``; conflicts: ``(winner, loser, pixels)``; all pixel
    counts, empty without ground truth (or without a merge, for conflicts).
    """

    label_path: str
    scores_path: str | None
    counts: tuple[tuple[int, int, int, int], ...] = ()
    confusion: tuple[tuple[int, int, int], ...] = ()
    sweep: tuple[tuple, ...] = ()
    conflicts: tuple[tuple[int, int, int], ...] = ()


class SourceVariant:
    """Read access to the variant a refinement starts from (its label maps and scores).

    ``variant_id`` names it, so a refinement that trains on it (AffinityNet) keys its model by it.
    """

    def __init__(self, label_path: Callable[[str], Path], scores_path: Callable[[str], Path | None],
                 variant_id: str | None = None):
        self.variant_id = variant_id
        self._label_path = label_path
        self._scores_path = scores_path

    def files(self, image_id: str) -> tuple[Path, Path | None]:
        """``(label map path, scores path or None)`` of ``image_id``; raises ``ImageError`` when
        the variant has no label map for it."""
        return self._label_path(image_id), self._scores_path(image_id)

    def label(self, image_id: str) -> np.ndarray:
        """``(H, W) uint8`` label map of the source variant for ``image_id``."""
        from cache.labelmaps import read_label_map

        return read_label_map(self._label_path(image_id))

    def scores(self, image_id: str) -> tuple[tuple[int, ...], np.ndarray] | None:
        """``(classes, (K, h, w) float32)`` stored scores, or None if the source kept none."""
        from cache.labelmaps import read_scores

        path = self._scores_path(image_id)
        return None if path is None else read_scores(path)

    def read(self, image_id: str) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray | None]:
        """What a refinement starts from for one image: ``(classes, scores, label)``.

        ``(classes, (K, h, w) float32, None)`` when the source stored scores (channel k for class
        ``classes[k]``, 0 = background), else ``((), None, (H, W) uint8 label map)``. Raises
        ``ImageError`` naming the image when a file is missing or cannot be decoded, or when the
        scores do not match their classes.
        """
        import zipfile

        from cache.labelmaps import LabelMapError

        try:
            stored = self.scores(image_id)
            if stored is None:
                return (), None, self.label(image_id)
            classes, scores = stored
            if scores.ndim != 3 or scores.shape[0] != len(classes):
                raise ValueError(f"scores of shape {scores.shape} for classes {list(classes)}")
            return tuple(int(c) for c in classes), np.asarray(scores, dtype=np.float32), None
        except (LabelMapError, ImageError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ImageError(f"source of {image_id} unreadable: {exc}") from exc


@dataclass
class RunContext:
    """Everything a plugin may use.

    classes: the dataset's class set (names, background, the width of a segmentation head).
    items: every valid image of the split (a method trains on these).
    todo: the images that still need a label map; a resumed job gets only the unfinished ones.
    workdir: a directory private to this variant that survives restarts.
    models: the cache's store of trained models, shared between variants (see ``model_dir``);
        None keeps them under ``workdir``.
    device: ``"cuda"`` when available, else ``"cpu"``.
    report: ``report(stage, done, total)`` records progress and a heartbeat; raises ``Cancelled``.
    source: the input variant, for refinements (None for methods).
    processes: how many worker processes CPU-bound per-image steps may use.
    ray_address: the Ray cluster those steps run on as tasks instead (``engine.ops.pool.open_pool``;
        ``"auto"``: this machine's), None: local processes.
    variants: ``variants(variant_id)`` opens any variant of the cache (an ensemble reads its
        candidates); raises ``KeyError`` for an unknown id.
    source_items: the usable images of the source variant's own split that it has label maps
        for (a segmentation network trains on these and predicts ``todo``, e.g. the val split).
    log: ``log(name, step, value)`` records a training curve point (loss, validation mIoU) with
        the variant, written with the next batch of results.
    finish: ``finish(result, item) -> LabelResult``, set by the worker: writes the result's files
        and counts its rows. ``engine.ops.pool.run_jobs`` applies it in the process (or Ray task)
        that made the result, so that work runs in parallel too; picklable. None: the worker
        does it when it records the result.
    """

    classes: ClassSet = field(kw_only=True)
    items: Sequence[Item]
    todo: Sequence[Item]
    workdir: Path
    device: str = "cpu"
    report: Callable[[str, int, int], None] = field(default=lambda stage, done, total: None)
    source: SourceVariant | None = None
    processes: int = 2
    ray_address: str | None = None
    models: Path | None = None
    variants: Callable[[str], SourceVariant] | None = None
    source_items: Sequence[Item] = ()
    log: Callable[[str, int, float], None] = field(default=lambda name, step, value: None)
    finish: Callable[[LabelResult, Item], LabelResult] | None = None

    def model_dir(self, family: str, params: dict[str, Any], images: Sequence[Item] | None = None) -> Path:
        """The directory of the model of ``family`` trained with ``params`` (created).

        Keyed by a hash of the training settings and of the training images' paths (``images``,
        default ``items``), so variants that differ in inference settings (a threshold, the scales,
        which output is read) share one trained model, while a changed training setting or another
        image set gets a new directory instead of a stale checkpoint.
        """
        images = [str(item.image_path) for item in (self.items if images is None else images)]
        key = hashlib.sha1(json.dumps([params, images], sort_keys=True).encode()).hexdigest()[:12]
        path = (self.models if self.models is not None else self.workdir / "models") / family / key
        path.mkdir(parents=True, exist_ok=True)
        return path
