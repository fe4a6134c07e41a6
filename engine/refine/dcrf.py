"""Dense CRF refinement of pseudo-labels (refinement ``dcrf``): a step after any variant.

Fully connected CRF with Gaussian edge potentials, mean-field inference (Kraehenbuehl & Koltun,
NIPS 2011, Sec. 2-4) with PSA's settings (Ahn & Kwak, CVPR 2018, ``tool/imutils.py:
crf_inference``; PuzzleCAM): smoothness kernel sxy 3 / weight 3, appearance kernel sxy 80 / srgb
13 / weight 10, 10 iterations; the numerics are ``engine.ops.crf``.

In: the image ``(H, W, 3) uint8`` and the source variant's class scores ``(K, h, w)`` (class 0 =
background), or, when the source stored no scores, its label map ``(H, W) uint8`` as a unary that
trusts each label with probability ``gt_prob`` (IRN/PuzzleCAM ``crf_inference_label``).
Out: per image the label ``classes[argmax Q]`` ``(H, W) uint8`` and the marginals ``Q``
``(K, h, w) float16`` (long side ``scores_side``). Images run on ``ctx.processes`` processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.classes import IGNORE_INDEX
from engine.core.dataset import label_image_file
from engine.core.registry import Offer, Role, register
from engine.core.types import ImageError, LabelResult, RunContext
from engine.ops.crf import DCRFConfig, dcrf_refine, dcrf_refine_labels, scores_to_probs
from engine.ops.pool import run_jobs
from engine.ops.scores import argmax_label, resize_channels


def _shrink(q: np.ndarray, side: int) -> np.ndarray:
    """``Q`` resized so its longest side is at most ``side``, as float16."""
    height, width = q.shape[1:]
    scale = min(1.0, side / max(height, width))
    small = resize_channels(q, max(1, round(height * scale)), max(1, round(width * scale)))
    return small.astype(np.float16)


@dataclass(frozen=True)
class _Job:
    """What a worker process needs for one image (picklable; the source is read by the parent)."""

    image_id: str
    image_path: Path
    classes: tuple[int, ...]
    scores: np.ndarray | None  # (K, h, w) float32 source scores, or None
    label: np.ndarray | None  # (H, W) uint8 source label map when there are no scores


def _refine_job(job: _Job, cfg: DCRFConfig) -> LabelResult:
    return label_image_file(job.image_id, job.image_path, lambda rgb: _refine(rgb, job, cfg))


def _refine(rgb: np.ndarray, job: _Job, cfg: DCRFConfig) -> LabelResult:
    height, width = rgb.shape[:2]
    if job.scores is not None:
        probs = scores_to_probs(resize_channels(job.scores, height, width), cfg.clip)
        q = dcrf_refine(rgb, probs, cfg)
    else:
        if job.label.shape != (height, width):
            (lh, lw) = job.label.shape
            error = f"source label map of {job.image_id} is {lw}x{lh} (WxH) but {job.image_path} is {width}x{height}"
            return LabelResult(job.image_id, error=error)
        q = dcrf_refine_labels(rgb, job.label, job.classes, cfg)
    return LabelResult(job.image_id, label=argmax_label(q, job.classes), scores=_shrink(q, cfg.scores_side),
                       score_classes=job.classes)


def _make_job(ctx: RunContext, image_id: str, image_path: Path) -> _Job | LabelResult:
    """Read the source variant of one image in the parent process, or an error result."""
    if ctx.source is None:
        raise ValueError("dcrf is a refinement: the run needs a source variant (ctx.source is None)")
    try:
        classes, scores, label = ctx.source.read(image_id)
    except ImageError as exc:
        return LabelResult(image_id, error=str(exc))
    if scores is not None:
        return _Job(image_id, image_path, classes, scores, None)
    classes = tuple(int(c) for c in np.unique(label) if c != IGNORE_INDEX)
    if not classes:  # nothing labelled: all background, or left undecided when there is none
        if not ctx.classes.has_background:
            return LabelResult(image_id, label=label)
        classes = (ctx.classes.background,)
    return _Job(image_id, image_path, classes, None, label)


@register("dcrf", role=Role.REFINEMENT, config=DCRFConfig, title="dCRF", offers={Offer.QUEUE})
def run(cfg: DCRFConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Refine the source variant of each image of ``ctx.todo`` with a dense CRF.

    Uses ``ctx.processes`` spawned worker processes (in-process when 1; results in order), or Ray
    tasks when ``ctx.ray_address`` is set (in order of completion), with a bounded window of
    images in flight; a bad image or unreadable source file yields ``LabelResult(error=...)``.
    """
    jobs = (_make_job(ctx, item.image_id, item.image_path) for item in ctx.todo)
    yield from run_jobs(_refine_job, jobs, ctx, cfg)
