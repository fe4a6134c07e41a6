"""SVM expansion of a seed (refinement ``svm``): a per-image SVM trained on a variant's confident regions.

Lyu, Beausery & Baussard (shared/papers/svm-expansion-multi-features.md), Sec. 3-4, Fig. 5.a: the
paper's WSSS pipeline. Sample labels come from the source variant (e.g. CAM): foreground where one
class's source score is high, background where every class score is low, the band between never
sampled (``engine.ops.svm.confident_regions``); a source that stored no scores gives its label
map, each class region eroded (``eroded_regions``). The SVM on backbone features then labels every
pixel (``engine.ops.svm``).

In: the source's scores ``(K, h, w)`` or label map ``(H, W) uint8`` per ``ctx.todo`` image. Out:
label ``(H, W) uint8`` and the softmax of the margins ``(K, h, w) float16``. Measurements (layer and
threshold studies): docs/methods/svm.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.dataset import label_image_file
from engine.core.registry import Offer, Role, register
from engine.core.types import ImageError, Item, LabelResult, RunContext
from engine.ops.pool import run_jobs
from engine.ops.scores import resize_channels
from engine.ops.svm import SVMConfig, confident_regions, eroded_regions, svm_result


@dataclass(frozen=True)
class SVMSeedConfig(SVMConfig):
    """Seed mode (paper Fig. 5.a): sample labels from the confident regions of the source variant.

    Thresholds apply to the source's foreground class scores, read at image size. CAM scores are
    max-normalised per class and CAM's own label map cuts at 0.3: a pixel at >= 0.6 of its class's
    peak is well inside the object, one where every class is <= 0.2 well outside, and the band
    between, where CAM's boundary is uncertain, is not sampled. dCRF marginals sum to 1 over
    classes, so the same numbers read as probabilities there.
    """

    fg_threshold: float = 0.6  # a pixel is a sample of class c if c's score >= this and is the top class
    bg_threshold: float = 0.2  # a pixel is a background sample if every class score <= this
    erode_px: int = 8  # label-map fallback (no stored scores): shrink each region by this many pixels

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.bg_threshold < self.fg_threshold <= 1.0:
            raise ValueError("need 0 <= bg_threshold < fg_threshold <= 1, "
                             f"got {self.bg_threshold}, {self.fg_threshold}")
        if self.erode_px < 0:
            raise ValueError(f"erode_px must be >= 0, got {self.erode_px}")


@dataclass(frozen=True)
class _Job:
    """One image for a worker process (picklable; the source is read by the parent)."""

    image_id: str
    image_path: Path
    allowed: tuple[int, ...]  # background + the image's labels: the only classes ever sampled
    scores: np.ndarray | None = None  # (K, h, w) float32 source scores ...
    score_classes: tuple[int, ...] = ()
    label: np.ndarray | None = None  # ... or, without scores, the (H, W) uint8 source label map
    source_file: str = ""  # names the source in messages
    threads: int = 0  # torch threads in this process (0 = leave as is)


def _seed_job(job: _Job, cfg: SVMSeedConfig) -> LabelResult:
    """Sample labels from the source variant's confident regions (paper Fig. 5.a)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    return label_image_file(job.image_id, job.image_path, lambda rgb: _expand_seed(rgb, job, cfg))


def _expand_seed(rgb: np.ndarray, job: _Job, cfg: SVMSeedConfig) -> LabelResult:
    height, width = rgb.shape[:2]
    if job.scores is not None:
        scores = resize_channels(job.scores, height, width)
        sample_label = confident_regions(scores, job.score_classes, job.allowed, cfg.fg_threshold, cfg.bg_threshold)
    elif job.label.shape != (height, width):
        (lh, lw) = job.label.shape
        return LabelResult(job.image_id, error=f"source label map of {job.image_id} is {lw}x{lh} (WxH) "
                                               f"but {job.image_path} is {width}x{height}")
    else:
        sample_label = eroded_regions(job.label, job.allowed, cfg.erode_px)
    return svm_result(job.image_id, rgb, sample_label, cfg, job.source_file)


def _seed_source(ctx: RunContext, item: Item, threads: int) -> _Job | LabelResult:
    """Read one image's source variant in the parent process, or an error result."""
    allowed = (0, *item.labels)
    try:
        classes, scores, label = ctx.source.read(item.image_id)
    except ImageError as exc:
        return LabelResult(item.image_id, error=str(exc))
    if scores is not None:
        return _Job(item.image_id, item.image_path, allowed, scores=scores, score_classes=classes,
                    source_file=f"source scores of {item.image_id}", threads=threads)
    return _Job(item.image_id, item.image_path, allowed, label=label,
                source_file=f"source label map of {item.image_id}", threads=threads)


@register("svm", role=Role.REFINEMENT, config=SVMSeedConfig, title="SVM (seed)",
          offers={Offer.QUEUE}, needs_background=True)
def run(cfg: SVMSeedConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Expand the source variant (e.g. CAM) with a per-image SVM trained on its confident regions.

    One result per ``ctx.todo`` image, computed in ``ctx.processes`` worker processes (or Ray tasks);
    a bad image or unreadable source yields ``LabelResult(error=...)`` naming the file.
    """
    if ctx.source is None:
        raise ValueError("svm is a refinement: the run needs a source variant (ctx.source is None)")
    threads = 1 if ctx.processes > 1 else 0
    jobs = (_seed_source(ctx, it, threads) for it in ctx.todo)
    yield from run_jobs(_seed_job, jobs, ctx, cfg)
