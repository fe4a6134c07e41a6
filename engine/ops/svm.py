"""Image-specific SVM expansion numerics: one pixel-wise SVM per image on backbone features.

Lyu, Beausery & Baussard, "Study of an Expansion Method Based on an Image-Specific Classifier and
Multi-Features for WSSS" (shared/papers/svm-expansion-multi-features.md). For each image, pixels
are sampled per class (Sec. 3.1: n uniform random samples for each class present and for the
background), described by a layer's activations bilinearly upsampled to the image size and
z-score normalised (Sec. 4.1), and used to train a one-vs-all SVM (Sec. 3.2) that then labels
every pixel of the same image. Shared by the seed refinement (``svm``, Fig. 5.a) and the oracle
method (``svm-oracle``, Fig. 5.b, Table 1), which differ only in where the samples come from.

Features (``layer``): the paper's F1-F5 are ResNet-50's 5 stages (SIPE). Here they are ImageNet
EfficientNet-Lite0's 5 resolution levels, timm's ``feature_info`` points (``LAYERS``):
F1 = blocks.0 (16 ch, stride 2), F2 = blocks.1 (24, 4), F3 = blocks.2 (40, 8), F4 = blocks.4 (112,
16), F5 = blocks.6 (320, 32; the paper's F5 is 1/16); or ``"rgb"``, the image itself (Table 1 "img").
Per image: rgb ``(H, W, 3) uint8`` -> ``layer_features`` ``(C, H, W) float32``; sample labels
``(H, W) uint8`` (255 = not sampled) -> ``svm_expand`` -> label ``(H, W) uint8`` and decision
values ``(K, H, W)`` -> ``svm_result`` scores ``(K, h, w) float16`` (softmax of the margins).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_erosion
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import SVC, LinearSVC

from cache.classes import IGNORE_INDEX
from engine.core.types import LabelResult
from engine.ops.backbone import FeatureExtractor, load_feature_extractor, to_input
from engine.ops.scores import argmax_label, downsample_scores, strided_to_image

# Paper layer name -> how many of ``FeatureExtractor.stages`` to run (stem, blocks.0, ..., head)
# and the stride of that output; the points timm lists in ``feature_info`` for EfficientNet.
LAYERS: dict[str, tuple[int, int]] = {"F1": (2, 2), "F2": (3, 4), "F3": (4, 8), "F4": (6, 16), "F5": (8, 32)}
RGB = "rgb"  # the image itself as the pixel feature (Table 1, row "img")
KERNELS = ("linear", "rbf")
_EPS = 1e-6  # a channel whose std is below this is constant over the image: z-score 0


@dataclass(frozen=True)
class SVMConfig:
    """Settings of the expansion (the oracle method's config; the seed refinement adds its
    thresholds). Defaults fit the CPU budget: a one-vs-rest linear SVM (LinearSVC) on F4 with 500
    samples per class, predicting every pixel (docs/methods/svm.md). ``PAPER_PARAMS`` gives the
    paper's n = 2,500 and its best layer F1, RBF, predicting every pixel (minutes an image here).
    """

    layer: str = "F4"  # "F1".."F5" (LAYERS) or "rgb"; linear F4 is the best linear layer from CAM seeds
    n_samples: int = 500  # per class, background included (paper Sec. 4.1: 2,500)
    kernel: str = "linear"  # "linear": LinearSVC, every pixel; "rbf": SVC in a one-vs-rest wrapper, on a grid
    svm_c: float = 1.0  # SVM regularisation C (scikit-learn default; the paper gives none)
    rbf_grid_side: int = 64  # RBF only: predict on a grid of this long side (~8 px cells at 500x375), 0 = every pixel
    seed: int = 0  # sampling RNG; combined with the image id, so results do not depend on order
    score_max_side: int = 128  # stored scores are downsampled so max(h, w) <= this
    backbone: str = "efficientnet_lite0"  # engine.ops.backbone.BACKBONES key (ImageNet weights)

    def __post_init__(self) -> None:
        if self.layer not in (*LAYERS, RGB):
            raise ValueError(f"layer must be one of {[*LAYERS, RGB]}, got {self.layer!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, got {self.kernel!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.svm_c <= 0:
            raise ValueError(f"svm_c must be > 0, got {self.svm_c}")
        if self.rbf_grid_side < 0 or self.score_max_side < 1:
            raise ValueError("rbf_grid_side must be >= 0 and score_max_side >= 1")


# The paper's settings (Sec. 4.1): n = 2,500 per class and its best layer F1 (Table 1). The
# kernel is not named; scikit-learn's SVC default (RBF, C = 1) is taken, predicting every pixel
# (Sec. 3.1: the test data is all pixels).
PAPER_PARAMS: dict[str, Any] = {"n_samples": 2500, "layer": "F1", "kernel": "rbf", "rbf_grid_side": 0}


# --------------------------------------------------------------------------------------------
# Numerics (pure functions)


def zscore(features: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the image (paper Sec. 4.1): ``(x - mean) / std``.

    features: ``(C, H, W)`` float. Returns ``(C, H, W) float32`` with mean 0 and (population) std 1
    per channel; a channel constant over the image (std < 1e-6) becomes all 0.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise ValueError(f"expected features of shape (C, H, W), got {features.shape}")
    flat = features.reshape(features.shape[0], -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = flat.std(axis=1, dtype=np.float64)
    scale = np.where(std < _EPS, 0.0, 1.0 / np.maximum(std, _EPS))
    return ((features - mean[:, None, None].astype(np.float32)) * scale[:, None, None].astype(np.float32))


def balanced_sample(sample_label: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` pixels of every class in ``sample_label``, drawn uniformly without replacement.

    sample_label: ``(H, W) uint8``, a class id per pixel (0 = background) or 255 = not a sample.
    Paper Sec. 3.1: the same n for each class and the background, so the SVM sees balanced data.
    A class with fewer than ``n`` pixels contributes all of them (no pixel is drawn twice, so no
    duplicated sample outweighs the others); that class, a small object or a region thinned by
    the seed thresholds, is then under-represented in the training set.
    Returns ``(indices (N,) int64, labels (N,) uint8)``: flat pixel indices into ``(H * W)``,
    grouped by class in increasing id, sorted within a class.
    """
    sample_label = np.asarray(sample_label)
    if sample_label.ndim != 2:
        raise ValueError(f"expected a (H, W) sample label map, got {sample_label.shape}")
    flat = sample_label.ravel()
    indices, labels = [], []
    for c in np.unique(flat):
        if c == IGNORE_INDEX:
            continue
        pool = np.flatnonzero(flat == c)
        chosen = np.sort(rng.choice(pool, n, replace=False)) if pool.size > n else pool
        indices.append(chosen)
        labels.append(np.full(chosen.size, c, dtype=np.uint8))
    if not indices:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(indices).astype(np.int64), np.concatenate(labels)


def confident_regions(scores: np.ndarray, classes: Sequence[int], allowed: Sequence[int],
                      fg_threshold: float, bg_threshold: float) -> np.ndarray:
    """Sample labels from the confident parts of a source's class scores (seed mode, Fig. 5.a).

    scores: ``(K, H, W) float32`` at image size, channel k for class ``classes[k]`` (0 =
    background). Only the foreground channels in ``allowed`` (the image's labels) are read: CAM's
    background channel is a constant, and where a source has a real one (dCRF marginals) it is
    low exactly where some foreground score is high. Per pixel, with ``top`` the highest allowed
    foreground score:
        ``top >= fg_threshold``  -> that class (ties: the first channel);
        ``top <= bg_threshold``  -> 0 (background; also every pixel when no class is allowed);
        otherwise                -> 255 (unsure, never sampled).
    Returns ``(H, W) uint8``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3 or scores.shape[0] != len(classes):
        raise ValueError(f"expected scores of shape ({len(classes)}, H, W) for classes {tuple(classes)}, "
                         f"got {scores.shape}")
    keep = [k for k, c in enumerate(classes) if c != 0 and c in allowed]
    out = np.full(scores.shape[1:], IGNORE_INDEX, dtype=np.uint8)
    if not keep:
        out[:] = 0
        return out
    fg = scores[keep]
    top = fg.max(axis=0)
    ids = np.asarray([classes[k] for k in keep], dtype=np.uint8)
    sure_fg = top >= fg_threshold
    out[sure_fg] = ids[fg.argmax(axis=0)][sure_fg]
    out[top <= bg_threshold] = 0
    return out


def eroded_regions(label: np.ndarray, allowed: Sequence[int], erode_px: int) -> np.ndarray:
    """Sample labels from a hard label map: each class region shrunk by ``erode_px`` pixels.

    label: ``(H, W) uint8`` source label map. Pixels near a region's boundary are where a seed is
    least reliable, so they become 255 (not sampled); the image border does not erode a region
    (``border_value=1``). Classes not in ``allowed`` (background 0 plus the image's labels) and
    255 are never sampled. Returns ``(H, W) uint8``.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected a (H, W) label map, got {label.shape}")
    out = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
    for c in np.unique(label):
        if c == IGNORE_INDEX or c not in allowed:
            continue
        region = label == c
        if erode_px > 0:
            region = binary_erosion(region, iterations=erode_px, border_value=1)
        out[region] = c
    return out


def softmax_scores(decision: np.ndarray) -> np.ndarray:
    """``(K, ...)`` one-vs-rest decision values -> ``(K, ...) float32`` in [0, 1] summing to 1 over K.

    A softmax (temperature 1) over the K margins: monotone in each class's margin, the argmax is
    kept, and the result reads as class probabilities downstream (dcrf ``scores_to_probs``). It is
    not calibrated (Platt scaling would need cross-validated refits per image).
    """
    decision = np.asarray(decision, dtype=np.float32)
    shifted = np.exp(decision - decision.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def pixel_features(raw: torch.Tensor, stride: int, image_hw: tuple[int, int]) -> np.ndarray:
    """A layer's activations as per-pixel features: bilinear to image size, z-score (Sec. 3.1, 4.1).

    raw: ``(C, h, w) float32`` computed with ``stride`` on the ``(H, W) = image_hw`` image (TF
    "same" padding: it covers ``h * stride`` pixels, cropped as in ``scores.strided_to_image``); for
    ``"rgb"`` pass the ``(3, H, W)`` image with stride 1. Returns ``(C, H, W) float32``.
    """
    if raw.ndim != 3:
        raise ValueError(f"expected activations of shape (C, h, w), got {tuple(raw.shape)}")
    up = raw.float() if stride == 1 else strided_to_image(raw.float(), stride, image_hw, image_hw)
    return zscore(up.numpy())


def fit_svm(x: np.ndarray, y: np.ndarray, kernel: str, svm_c: float) -> LinearSVC | OneVsRestClassifier:
    """A one-vs-all SVM (paper Sec. 3.2) on ``x: (N, C) float32``, ``y: (N,)`` with >= 2 classes.

    ``"linear"``: scikit-learn ``LinearSVC`` (liblinear, one-vs-rest, squared hinge loss).
    ``"rbf"``: ``SVC(kernel="rbf", gamma="scale")`` per class in ``OneVsRestClassifier`` (SVC alone
    would be one-vs-one). Two classes give one binary SVM in both cases.
    """
    if np.unique(y).size < 2:
        raise ValueError("an SVM needs samples of at least 2 classes")
    if kernel == "linear":
        return LinearSVC(C=svm_c).fit(x, y)
    return OneVsRestClassifier(SVC(kernel="rbf", C=svm_c, gamma="scale")).fit(x, y)


def decision_values(svm: LinearSVC | OneVsRestClassifier, x: np.ndarray) -> np.ndarray:
    """``x: (M, C)`` -> ``(K, M) float32``, row k the margin of ``svm.classes_[k]``.

    A binary SVM has one margin d (positive = ``classes_[1]``); it becomes the rows ``(-d, d)``.
    """
    d = np.asarray(svm.decision_function(x), dtype=np.float32)
    return np.stack([-d, d]) if d.ndim == 1 else d.T


def svm_expand(features: np.ndarray, sample_label: np.ndarray, n: int, rng: np.random.Generator, kernel: str,
               svm_c: float = 1.0, grid_side: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Train an image-specific SVM on sampled pixels and label every pixel (paper Sec. 3, Fig. 5).

    features: ``(C, H, W) float32`` per-pixel features (``pixel_features``).
    sample_label: ``(H, W) uint8``, sample labels (255 = not sampled); ``balanced_sample`` draws up
        to ``n`` pixels per class with ``rng``.
    grid_side: 0 predicts every pixel; else the features are area-averaged onto a grid of this long
        side, predicted there and the decision values bilinearly upsampled (for the RBF kernel,
        whose prediction cost grows with support vectors x pixels).
    Returns ``(label (H, W) uint8, decision (K, H, W) float32, classes)``: the K classes that had
    samples, in increasing id; only they can be predicted. With one such class the label is that
    class everywhere (decision all 0); with none, all 255.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3 or features.shape[1:] != np.shape(sample_label):
        raise ValueError(f"expected features (C, H, W) matching sample labels {np.shape(sample_label)}, "
                         f"got {features.shape}")
    channels, height, width = features.shape
    index, y = balanced_sample(sample_label, n, rng)
    classes = tuple(int(c) for c in np.unique(y))
    if len(classes) < 2:
        fill = classes[0] if classes else IGNORE_INDEX
        return np.full((height, width), fill, np.uint8), np.zeros((len(classes), height, width), np.float32), classes
    flat = features.reshape(channels, -1)
    svm = fit_svm(np.ascontiguousarray(flat[:, index].T), y, kernel, svm_c)
    classes = tuple(int(c) for c in svm.classes_)  # the order of the decision rows
    if grid_side and max(height, width) > grid_side:
        scale = grid_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        grid = F.interpolate(torch.from_numpy(features)[None], size=size, mode="area")[0].numpy()
        coarse = decision_values(svm, grid.reshape(channels, -1).T).reshape(len(classes), *size)
        decision = F.interpolate(torch.from_numpy(coarse)[None], size=(height, width), mode="bilinear",
                                 align_corners=False)[0].numpy()
    else:
        decision = decision_values(svm, flat.T).reshape(len(classes), height, width)
    return argmax_label(decision, classes), decision, classes


@lru_cache(maxsize=2)
def _extractor(backbone: str) -> FeatureExtractor:
    return load_feature_extractor(backbone, output_stride=32)


@torch.no_grad()
def layer_features(rgb: np.ndarray, layer: str, backbone: str = "efficientnet_lite0") -> np.ndarray:
    """``rgb: (H, W, 3) uint8`` -> ``(C, H, W) float32`` z-scored per-pixel features of ``layer``.

    Runs only the backbone stages up to the layer (ImageNet EfficientNet-Lite, output stride 32;
    ``LAYERS``). ``"rgb"`` gives the 3 colour channels, z-scored.
    """
    height, width = rgb.shape[:2]
    if layer == RGB:
        channels = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()
        return pixel_features(channels, 1, (height, width))
    count, stride = LAYERS[layer]
    x = to_input(rgb)[None]
    for stage in _extractor(backbone).stages[:count]:
        x = stage(x)
    return pixel_features(x[0], stride, (height, width))


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The sampling RNG of one image: the same draws whatever order or process runs it."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def svm_result(image_id: str, rgb: np.ndarray, sample_label: np.ndarray, cfg: SVMConfig,
               sample_file: Path | str) -> LabelResult:
    """Features, SVM and the ``LabelResult`` of one image (label ``(H, W) uint8``, scores
    ``(K, h, w) float16``); ``sample_file`` names where the sample labels came from in the error
    of an image with nothing to sample."""
    if (sample_label == IGNORE_INDEX).all():
        return LabelResult(image_id, error=f"{sample_file}: no pixel of {image_id} to sample (all 255 or unsure)")
    features = layer_features(rgb, cfg.layer, cfg.backbone)
    grid = cfg.rbf_grid_side if cfg.kernel == "rbf" else 0
    label, decision, classes = svm_expand(features, sample_label, cfg.n_samples, image_rng(cfg.seed, image_id),
                                          cfg.kernel, cfg.svm_c, grid)
    scores = softmax_scores(decision) if len(classes) > 1 else np.ones_like(decision)
    return LabelResult(image_id, label=label, scores=downsample_scores(scores, cfg.score_max_side),
                       score_classes=classes)
