"""What the worker makes of one ``LabelResult`` before it records it: the label map and scores
written into the cache folder and the image's rows counted against its ground truth.

``Recorder`` is picklable and pure apart from the two files it writes (atomically), so it runs
where the result is made: in the pool process or Ray task of a ``run_jobs`` step
(``RunContext.finish``), else in the worker. The worker then only queues the rows and records
them in DuckDB, which stays its job alone. Moving this work out of the worker's main process is
what lets the ISLE merge use both cores (``bench.ensemble_merge``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.classes import ClassSet
from cache.labelmaps import write_label_map, write_scores
from engine.core.dataset import read_mask
from engine.core.types import ImageError, Item, LabelResult, Recorded
from engine.ops.metrics import confusion_cells, counts_from_cells
from engine.ops.sweep import pairs_from_cells, sweep_counts


@dataclass(frozen=True)
class Recorder:
    """Writes a variant's files and counts its rows.

    cache_dir: the cache folder; the files go to ``labels/<variant>/<image>.png`` and
    ``scores/<variant>/<image>.npz`` under it. sweep_grid: the background thresholds of the
    threshold sweep (for results with a ``peak``).
    """

    cache_dir: Path
    variant_id: str
    classes: ClassSet
    sweep_grid: tuple[float, ...]

    def __call__(self, result: LabelResult, item: Item) -> LabelResult:
        """``result`` with its files written and ``recorded`` set (the arrays dropped), or an
        error result naming the file and the problem: a label map of the wrong shape, a bad
        ground-truth mask or unknown label values. An error or an already recorded result is
        returned as it is."""
        if result.error is not None or result.recorded is not None:
            return result
        try:
            return LabelResult(result.image_id, recorded=self._record(result, item))
        except (ImageError, ValueError) as exc:
            return LabelResult(result.image_id, error=str(exc))

    def _record(self, result: LabelResult, item: Item) -> Recorded:
        label = result.label
        if label is None or label.shape != (item.height, item.width):
            shape = None if label is None else label.shape
            raise ImageError(f"{item.image_path}: pseudo-label shape {shape} differs from image size "
                             f"{(item.height, item.width)}")
        counts, confusion, sweep = (), (), ()
        if item.mask_path is not None:  # counted before any file is written: a bad mask writes nothing
            counts, confusion, sweep = count_rows(item, label, result.peak, self.classes, self.sweep_grid)
        label_path = Path("labels") / self.variant_id / f"{item.image_id}.png"
        write_label_map(self.cache_dir / label_path, label, self.classes)
        scores_path = None
        if result.scores is not None:
            scores_path = Path("scores") / self.variant_id / f"{item.image_id}.npz"
            write_scores(self.cache_dir / scores_path, result.score_classes, result.scores)
        conflicts = ()
        if result.conflicts is not None:
            winners, losers = np.nonzero(result.conflicts)
            conflicts = tuple((int(w), int(l), int(result.conflicts[w, l])) for w, l in zip(winners, losers))
        return Recorded(str(label_path), str(scores_path) if scores_path else None, counts, confusion, sweep,
                        conflicts)


def count_rows(item: Item, label: np.ndarray, peak: tuple[np.ndarray, np.ndarray] | None, classes: ClassSet,
               sweep_grid: tuple[float, ...]) -> tuple[tuple, tuple, tuple]:
    """One label map ``(H, W) uint8`` against its image's ground truth: the non-zero
    ``(class, tp, fp, fn)`` counts, the ``(gt, pred, pixels)`` confusion cells and, with a
    ``peak``, the non-zero ``(threshold, class, tp, fp, fn, fp_bg)`` sweep rows
    (``engine.ops.sweep.sweep_counts``). Raises ``ImageError`` / ``ValueError`` for a bad mask or
    label values."""
    gt = read_mask(item.mask_path, (item.height, item.width))
    cells = confusion_cells(gt, label, classes.num_classes)  # one pass gives both kinds of rows
    counts = tuple((class_id, tp, fp, fn) for class_id, (tp, fp, fn)
                   in enumerate(counts_from_cells(cells).tolist()) if tp or fp or fn)
    confusion = tuple(map(tuple, pairs_from_cells(cells).tolist()))
    sweep = ()
    if peak is not None:
        by_threshold = sweep_counts(gt, *peak, sweep_grid, classes.num_classes).tolist()
        sweep = tuple((threshold, class_id, *row) for threshold, by_class in zip(sweep_grid, by_threshold)
                      for class_id, row in enumerate(by_class) if row[0] or row[1] or row[2])
    return counts, confusion, sweep
