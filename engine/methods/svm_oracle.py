"""SVM expansion from the GROUND TRUTH: the upper bound of the image-specific SVM (``svm-oracle``).

Lyu, Beausery & Baussard (shared/papers/svm-expansion-multi-features.md), Fig. 5.b and Table 1:
the same per-image SVM as the seed refinement (``engine.ops.svm``), its sample labels taken from
the image's ground-truth mask (255 never sampled). It reads the ground truth, so it is an oracle:
it measures what the expansion could reach with error-free samples, never a WSSS result and never
a default ISLE candidate.

In: each ``ctx.todo`` image and its mask. Out: label ``(H, W) uint8`` and the softmax of the SVM
margins ``(K, h, w) float16``. Measurements: docs/methods/svm.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache.classes import IGNORE_INDEX
from engine.core.dataset import read_image, read_mask
from engine.core.registry import Offer, Role, register
from engine.core.types import ImageError, LabelResult, RunContext
from engine.ops.pool import run_jobs
from engine.ops.svm import SVMConfig, svm_result


@dataclass(frozen=True)
class _Job:
    """One image for a worker process (picklable)."""

    image_id: str
    image_path: Path
    mask_path: Path | None
    allowed: tuple[int, ...]  # background + the image's labels: the only classes ever sampled
    threads: int = 0  # torch threads in this process (0 = leave as is)


def _oracle_job(job: _Job, cfg: SVMConfig) -> LabelResult:
    """GROUND TRUTH: sample labels are the image's ground-truth mask (paper Fig. 5.b)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        rgb = read_image(job.image_path)
        if job.mask_path is None:
            raise ImageError(f"{job.image_path}: no ground-truth mask for the oracle")
        truth = read_mask(job.mask_path, rgb.shape[:2])
    except ImageError as exc:
        return LabelResult(job.image_id, error=str(exc))
    sample_label = np.where(np.isin(truth, job.allowed), truth, IGNORE_INDEX).astype(np.uint8)
    return svm_result(job.image_id, rgb, sample_label, cfg, job.mask_path)


@register("svm-oracle", role=Role.ORACLE, config=SVMConfig, title="SVM (oracle, ground truth)",
          offers={Offer.QUEUE}, needs_background=True)
def run(cfg: SVMConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """USES GROUND TRUTH: per-image SVM trained on pixels labelled by ``item.mask_path`` (Fig. 5.b).

    One result per ``ctx.todo`` image, computed in ``ctx.processes`` worker processes (or Ray tasks);
    a bad image or mask yields ``LabelResult(error=...)`` naming the file.
    """
    threads = 1 if ctx.processes > 1 else 0  # one torch thread per worker process: no oversubscription
    jobs = (_Job(it.image_id, it.image_path, it.mask_path, (0, *it.labels), threads) for it in ctx.todo)
    yield from run_jobs(_oracle_job, jobs, ctx, cfg)
