"""Dense CRF numerics: the fully connected CRF that dCRF, ISIM and AffinityNet's labels share.

Fully connected CRF with Gaussian edge potentials, solved by mean-field inference (Kraehenbuehl &
Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011,
Sec. 2-4), through pydensecrf. ``DCRFConfig`` defaults are PSA's (Ahn & Kwak, CVPR 2018,
``tool/imutils.py: crf_inference``) and PuzzleCAM's; ``IRN_LABEL_DCRF`` is IRN's label dCRF
(``misc/imutils.py: crf_inference_label``), used on thresholded CAMs by isim Sec. 4.1 and by IRN's
``cam_to_ir_label``. Arrays in, arrays out: images ``(H, W, 3) uint8``, marginals ``(K, H, W) float32``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from cache.classes import IGNORE_INDEX
from engine.ops.cams import cams_to_label
from engine.ops.scores import argmax_label


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


def refine_pseudo_label(rgb: np.ndarray, cams: np.ndarray, classes: Sequence[int], threshold: float,
                        cfg: DCRFConfig) -> np.ndarray:
    """A thresholded, label-dCRF-refined CAM (isim Sec. 4.1 steps ii-iii, ``voc12/dataloader.py:
    update_cam``; IRN ``step/cam_to_ir_label.py``).

    rgb: ``(h, w, 3) uint8``; cams: ``(K, h, w) float32`` normalised CAMs of the object ``classes``.
    The CAMs are thresholded (background unless a class exceeds ``threshold``) and the hard map
    refined by dCRF with a label unary (``dcrf_refine_labels``).
    Returns ``(h, w) uint8`` with values in ``{0, *classes}``.
    """
    seed = cams_to_label(cams, classes, threshold)
    labels = (0, *classes)
    return argmax_label(dcrf_refine_labels(rgb, seed, labels, cfg), labels)
