"""Dense CRF refinement of pseudo-labels: a refinement step after any method.

Fully connected CRF with Gaussian edge potentials, solved by mean-field inference
(Kraehenbuehl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NIPS 2011, Sec. 2-4), through pydensecrf. The pairwise settings are those of PSA
(Ahn & Kwak, CVPR 2018, ``tool/imutils.py: crf_inference``) and PuzzleCAM (Jo & Yu, ICIP 2021):
a smoothness kernel (sxy 3, weight 3) and an appearance kernel (sxy 80, srgb 13, weight 10),
10 iterations.

In: the image ``(H, W, 3) uint8`` and the source variant's class scores ``(K, h, w)`` (class 0 =
background), or, when the source stored no scores, its label map ``(H, W) uint8`` turned into a
unary that trusts each label with probability ``gt_prob`` (IRN/PuzzleCAM ``crf_inference_label``).
Out: per image, the label ``classes[argmax Q]`` as ``(H, W) uint8`` and the marginals ``Q``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
from PIL import Image
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from cache.voc import IGNORE_INDEX
from engine.dataset import label_image_file
from engine.registry import register
from engine.pool import run_jobs
from engine.types import ImageError, LabelResult, RunContext


@dataclass(frozen=True)
class DCRFConfig:
    iters: int = 10  # mean-field steps; Kraehenbuehl & Koltun, NIPS 2011, Sec. 3; PSA t=10
    gaussian_sxy: float = 3.0  # smoothness kernel width in pixels (theta_gamma, Eq. 3)
    gaussian_compat: float = 3.0  # smoothness kernel weight (w2)
    bilateral_sxy: float = 80.0  # appearance kernel width in pixels (theta_alpha)
    bilateral_srgb: float = 13.0  # appearance kernel colour width (theta_beta)
    bilateral_compat: float = 10.0  # appearance kernel weight (w1)
    gt_prob: float = 0.7  # label-only unary: trust in the source label (IRN crf_inference_label)
    clip: float = 1e-5  # probability floor before -log (no infinite unary)
    scores_side: int = 128  # longest side of the stored marginals Q

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if not 0.0 < self.gt_prob < 1.0:
            raise ValueError(f"gt_prob must be in (0, 1), got {self.gt_prob}")
        if not 0.0 < self.clip < 1.0:
            raise ValueError(f"clip must be in (0, 1), got {self.clip}")
        if self.scores_side < 1:
            raise ValueError(f"scores_side must be >= 1, got {self.scores_side}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


# IRN's label dCRF (``misc/imutils.py: crf_inference_label``), used to refine thresholded CAMs into
# pseudo-labels (isim) and affinity labels (AffinityNet): label unary trusted at 0.7, smoothness
# kernel sxy 3 / weight 3, appearance kernel sxy 50 / srgb 5 / weight 10, 10 steps.
IRN_LABEL_DCRF = DCRFConfig(iters=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=50.0,
                            bilateral_srgb=5.0, bilateral_compat=10.0, gt_prob=0.7)


# ---------------------------------------------------------------------------------------------
# Numerics: arrays in, arrays out.


def scores_to_probs(scores: np.ndarray, clip: float = 1e-5) -> np.ndarray:
    """Per-pixel class probabilities from stored class scores.

    scores: ``(K, H, W)`` float, non-negative (CAM-style, any scale; NaN counts as 0).
    Returns ``(K, H, W) float32`` summing to 1 over K: scores floored at ``clip`` then divided by
    their sum, so no probability is 0 (finite unary ``-log p``) and a pixel scoring 0 for every
    class becomes uniform.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3 or scores.shape[0] < 1:
        raise ValueError(f"expected scores of shape (K, H, W), got {scores.shape}")
    floored = np.maximum(np.nan_to_num(scores, nan=0.0, posinf=1.0, neginf=0.0), clip)
    return floored / floored.sum(axis=0, keepdims=True)


def resize_channels(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` float maps to ``(K, height, width) float32`` (PIL, per channel)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (K, h, w), got {maps.shape}")
    if maps.shape[1:] == (height, width):
        return maps
    return np.stack(
        [np.asarray(Image.fromarray(m, mode="F").resize((width, height), Image.BILINEAR)) for m in maps]
    )


def scaled_dcrf(cfg: DCRFConfig, scale: float) -> DCRFConfig:
    """``cfg`` for an image resized by ``scale``: the spatial kernel widths (pixels) times ``scale``.

    Keeps the CRF's neighbourhoods the same part of the scene when dCRF runs at reduced size.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return replace(cfg, gaussian_sxy=cfg.gaussian_sxy * scale, bilateral_sxy=cfg.bilateral_sxy * scale)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected rgb of shape (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    return np.require(rgb, requirements=["C", "W"])  # pydensecrf needs a writable C buffer


def _mean_field(rgb: np.ndarray, unary: np.ndarray, n_labels: int, cfg: DCRFConfig) -> np.ndarray:
    """Mean-field marginals ``(K, H, W) float32`` for a ``(K, H*W)`` unary (Kraehenbuehl & Koltun, Alg. 1)."""
    height, width = rgb.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=rgb, compat=cfg.bilateral_compat)
    q = np.asarray(crf.inference(cfg.iters), dtype=np.float32)
    return q.reshape(n_labels, height, width)


def dcrf_refine(rgb: np.ndarray, probs: np.ndarray, cfg: DCRFConfig) -> np.ndarray:
    """Dense CRF marginals from class probabilities.

    rgb: ``(H, W, 3) uint8``; probs: ``(K, H, W) float32`` summing to 1 over K.
    Returns ``Q: (K, H, W) float32``, summing to 1 over K. Unary ``-log probs`` (clipped at
    ``cfg.clip``, pydensecrf ``unary_from_softmax``); pairwise kernels of ``cfg`` (NIPS 2011, Eq. 3).
    """
    rgb = _check_rgb(rgb)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"expected probs of shape (K, {rgb.shape[0]}, {rgb.shape[1]}), got {probs.shape}")
    n_labels = probs.shape[0]
    if n_labels == 1:
        return np.ones_like(probs)
    return _mean_field(rgb, unary_from_softmax(probs, clip=cfg.clip), n_labels, cfg)


def dcrf_refine_labels(rgb: np.ndarray, label: np.ndarray, classes: tuple[int, ...], cfg: DCRFConfig) -> np.ndarray:
    """Dense CRF marginals from a hard label map (no scores available).

    rgb: ``(H, W, 3) uint8``; label: ``(H, W) uint8``, values in ``classes`` or 255 (ignore).
    Returns ``Q: (K, H, W) float32``, channel k for ``classes[k]``. A labelled pixel gets
    probability ``cfg.gt_prob`` for its class and the rest spread evenly; an ignored pixel is
    uniform (pydensecrf ``unary_from_labels`` with ``zero_unsure``).
    """
    rgb = _check_rgb(rgb)
    label = np.asarray(label)
    if label.shape != rgb.shape[:2]:
        raise ValueError(f"expected label of shape {rgb.shape[:2]}, got {label.shape}")
    lookup = np.zeros(256, dtype=np.int64)  # 0 = unsure; class k -> k + 1
    lookup[list(classes)] = np.arange(1, len(classes) + 1)
    lookup[IGNORE_INDEX] = 0
    known = np.isin(label, list(classes)) | (label == IGNORE_INDEX)
    if not known.all():
        bad = sorted(set(np.unique(label[~known]).tolist()))
        raise ValueError(f"label values {bad} are not in classes {list(classes)} or 255")
    if len(classes) == 1:
        return np.ones((1, *label.shape), dtype=np.float32)
    unary = unary_from_labels(lookup[label], len(classes), gt_prob=cfg.gt_prob, zero_unsure=True)
    return _mean_field(rgb, unary, len(classes), cfg)


def _label_from_q(q: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """``(H, W) uint8`` class ids ``classes[argmax_k Q]``."""
    return np.asarray(classes, dtype=np.uint8)[q.argmax(axis=0)]


def _shrink(q: np.ndarray, side: int) -> np.ndarray:
    """``Q`` resized so its longest side is at most ``side``, as float16."""
    height, width = q.shape[1:]
    scale = min(1.0, side / max(height, width))
    small = resize_channels(q, max(1, round(height * scale)), max(1, round(width * scale)))
    return small.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# One image, as run in a worker process.


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
    return LabelResult(
        job.image_id, label=_label_from_q(q, job.classes), scores=_shrink(q, cfg.scores_side), score_classes=job.classes
    )


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
    classes = tuple(int(c) for c in np.unique(label) if c != IGNORE_INDEX) or (0,)
    return _Job(image_id, image_path, classes, None, label)


@register("dcrf", kind="refine", config=DCRFConfig, title="dCRF")
def run(cfg: DCRFConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Refine the source variant of each image of ``ctx.todo`` with a dense CRF, in order.

    Uses ``ctx.processes`` spawned worker processes (in-process when 1) with a bounded window of
    images in flight; a bad image or unreadable source file yields ``LabelResult(error=...)``.
    """
    jobs = (_make_job(ctx, item.image_id, item.image_path) for item in ctx.todo)
    yield from run_jobs(_refine_job, jobs, ctx.processes, cfg)
