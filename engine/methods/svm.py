"""Image-specific SVM expansion: one pixel-wise SVM per image on backbone features.

Lyu, Beausery & Baussard, "Study of an Expansion Method Based on an Image-Specific Classifier and
Multi-Features for WSSS" (shared/papers/svm-expansion-multi-features.md). For each image, pixels
are sampled per class (Sec. 3.1: n uniform random samples for each class present and for the
background, the same n for every class to avoid imbalance), described by a layer's activations
bilinearly upsampled to the image size and z-score normalised (Sec. 4.1), labelled, and used to
train a one-vs-all SVM (Sec. 3.2) that then labels every pixel of the same image.

Two plugins share the numerics below:
- ``"svm"`` (refinement, "SVM (seed)"): the paper's WSSS pipeline, Fig. 5.a. Sample labels come
  from the confident regions of a source variant (e.g. CAM): foreground where one class's source
  score is high, background where every class score is low (``confident_regions``); a source
  that stored no scores gives its label map, each class region eroded (``eroded_regions``).
- ``"svm-oracle"`` (method, "SVM (oracle, ground truth)"): the paper's upper-bound study,
  Fig. 5.b and Table 1. Sample labels come from the GROUND-TRUTH mask (``item.mask_path``; 255 is
  never sampled). It is not weakly supervised: it measures what the expansion could reach with
  error-free samples.

Features (``layer``): the paper's F1-F5 are the outputs of ResNet-50's 5 stages (SIPE). Here the
backbone is ImageNet EfficientNet-Lite0 (``engine.backbone``, output stride 32), whose 5
resolution levels are timm's ``feature_info`` points (``LAYERS``):
    F1 = blocks.0 (16 ch, stride 2)    F2 = blocks.1 (24 ch, stride 4)    F3 = blocks.2 (40 ch, stride 8)
    F4 = blocks.4 (112 ch, stride 16)  F5 = blocks.6 (320 ch, stride 32; the paper's F5 is 1/16)
or ``"rgb"``, the image itself (Table 1 row "img").

Data flow, per image (``(H, W)`` the image size, C channels of the layer, K trained classes):
    rgb ``(H, W, 3) uint8`` -> backbone prefix -> ``(C, h, w)`` -> bilinear to ``(C, H, W)``,
    z-score per channel -> ``pixel_features (C, H, W) float32``
    sample labels ``(H, W) uint8`` (255 = do not sample) -> ``balanced_sample`` -> ``(N,)`` indices
    -> SVM fit on ``(N, C)`` -> decision values ``(K, H, W)`` (RBF: on a grid of long side
    ``rbf_grid_side``, bilinearly upsampled) -> label ``(H, W) uint8`` (argmax),
    scores ``(K, h, w) float16`` = softmax of the decision values, long side ``score_max_side``.

Measured on the bundled voc2012-animals train split (~500x375 images). Costs are CPU seconds of
one process with one torch thread (what each pool worker does), taken while other jobs loaded
the 2 cores (load 3-6, so wall times were 1.5-3x higher); extrapolations assume 2 free cores.
    F4, RBF, n 500 (oracle samples)    0.49 CPU-s/image on 40 images -> 1,861 images ~ 7.6 min
    F3, RBF, n 500 (seed, CAM scores)  0.28 CPU-s/image on 40 images -> ~ 4.4 min
    seed, label-map fallback (erode 8) 0.41 CPU-s/image on 40 images -> ~ 6.4 min
    F4, linear, n 500 (the defaults)   0.53 CPU-s/image on 60 images (seed study) -> ~ 8 min
    plus ~10 s per worker process to import torch/timm/sklearn and load the backbone. Through the
    plugin with 2 processes on the loaded machine: 1.4 (oracle) and 1.1 (seed) wall-s/image.
    PAPER_PARAMS (F1, RBF, n 2,500, every pixel): 73 CPU-s on one image -> ~19 h for the split.

Oracle study (``experiments/svm_oracle_table.py``: 60 train images, every 31st, n = 500;
mIoU % over the 13 classes present; paper Table 1: ResNet-50/SIPE, n = 2,500, VOC train):
    feature          rgb    F1    F2    F3    F4    F5
    RBF, grid 64     53.9  61.5  78.6  83.7  88.8  82.4
    linear           44.0  48.4  61.4  65.1  87.3  89.1
    paper Table 1    66.0  96.7  95.4  95.2  90.5  75.9
Our curve peaks deeper than the paper's (F1): these are ImageNet features, not a classifier
trained on VOC (SIPE), and EfficientNet-Lite0's F1-F3 are thin (16-40 channels after 1-3 blocks)
where ResNet-50's are 64-512 channels. The default is the one-vs-rest linear SVM (LinearSVC) on
F4, for both modes: the linear kernel is the workbench's specified default, and from F4 on it
matches the RBF one (87.3 against 88.8 with oracle samples; 33.1 against 33.6 from CAM seeds on
60 images, below). Linear F5 scores 89.1 with oracle samples but costs twice as much (its 320
channels are upsampled to every pixel) and is 1.2 lower from CAM seeds. ``kernel="rbf"`` is one
flag away; it wins on the shallow layers F1-F3, where the classes are not linearly separable.

Seed mode from the default CAM variant (cam.py defaults; its scores, 128 long side), mIoU %:
    120 train images (every 15th), CAM 30.9:  F3 RBF 33.1 | F4 RBF 32.3 | F3 linear 30.9
    60 train images (every 31st), CAM 31.9:   F4 linear 33.1 | F5 linear 31.9 | F2 linear 32.1
    thresholds, F3 RBF, 60 images, CAM 31.9 (precision = share of sampled pixels whose label is
    right; coverage = share of pixels sampled-from):
        fg / bg     0.5/0.2  0.6/0.2  0.7/0.2  0.6/0.25  0.7/0.25    (n 1,000 at 0.6/0.2: 33.8)
        mIoU         33.7     33.6     33.2     33.7      32.8
        precision    82.2     84.8     86.7     83.9      85.6
        coverage     75       69       63       74        68
    30 images (CAM 33.9): bg threshold 0.05 / 0.1 / 0.2 at fg 0.5 -> 34.3 / 35.9 / 38.3
    label-map fallback, 60 images (CAM 31.9), erode_px 0 / 4 / 8 / 16 / 24 -> 33.2 / 33.3 /
    33.5 / 33.5 / 33.5
The SVM can only be as right as its samples: ~85% of the sampled CAM pixels are right, against
100% for the oracle, which is the gap between ~33 and ~89 mIoU (paper Sec. 4.2, 5).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
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

from cache.voc import IGNORE_INDEX
from engine.backbone import FeatureExtractor, load_feature_extractor, to_input
from engine.dataset import label_image_file, read_image, read_mask
from engine.methods.cam import cam_to_image_size, downsample_scores
from engine.pool import run_jobs
from engine.refine.dcrf import resize_channels
from engine.registry import register
from engine.types import ImageError, Item, LabelResult, RunContext

# Paper layer name -> how many of ``FeatureExtractor.stages`` to run (stem, blocks.0, ..., head)
# and the stride of that output; the points timm lists in ``feature_info`` for EfficientNet.
LAYERS: dict[str, tuple[int, int]] = {"F1": (2, 2), "F2": (3, 4), "F3": (4, 8), "F4": (6, 16), "F5": (8, 32)}
RGB = "rgb"  # the image itself as the pixel feature (Table 1, row "img")
KERNELS = ("linear", "rbf")
_EPS = 1e-6  # a channel whose std is below this is constant over the image: z-score 0


@dataclass(frozen=True)
class SVMConfig:
    """Settings of the oracle mode ``"svm-oracle"`` (ground-truth samples), shared by the seed mode.

    Defaults fit the CPU budget (module docstring): a one-vs-rest linear SVM (LinearSVC) on F4
    with 500 samples per class, predicting every pixel, ~0.5 CPU-s an image. ``PAPER_PARAMS`` gives the
    paper's n = 2,500 and its best layer F1, predicting every pixel (minutes an image here).
    """

    layer: str = "F4"  # "F1".."F5" (LAYERS) or "rgb"; oracle study: linear F4 87.3, F5 89.1 at 2x the cost
    n_samples: int = 500  # per class, background included (paper Sec. 4.1: 2,500)
    kernel: str = "linear"  # "linear": LinearSVC, every pixel; "rbf": SVC in a one-vs-rest wrapper, on a grid
    svm_c: float = 1.0  # SVM regularisation C (scikit-learn default; the paper gives none)
    rbf_grid_side: int = 64  # RBF only: predict on a grid of this long side (~8 px cells at 500x375), 0 = every pixel
    seed: int = 0  # sampling RNG; combined with the image id, so results do not depend on order
    score_max_side: int = 128  # stored scores are downsampled so max(h, w) <= this
    backbone: str = "efficientnet_lite0"  # engine.backbone.BACKBONES key (ImageNet weights)

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


@dataclass(frozen=True)
class SVMSeedConfig(SVMConfig):
    """Seed mode (paper Fig. 5.a): sample labels from the confident regions of the source variant.

    Thresholds apply to the source's foreground class scores, read at image size. CAM scores are
    max-normalised per class (cam.py) and CAM's own label map cuts at 0.3: a pixel at >= 0.6 of
    its class's peak is well inside the object, one where every class is <= 0.2 well outside,
    and the band between, where CAM's boundary is uncertain, is not sampled. On 60 train images
    these samples were 85% right and covered 69% of the pixels; stricter thresholds raise the
    precision but lose coverage, and the mIoU after the SVM stays within 1 point around them
    (module docstring). dCRF marginals sum to 1 over classes, so the same numbers read as
    probabilities there. The default layer is F4, the best linear one in the seed study.
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


# The paper's settings (Sec. 4.1): n = 2,500 per class and its best layer F1 (Table 1). The
# kernel is not named; scikit-learn's SVC default (RBF, C = 1) is taken, predicting every pixel
# (Sec. 3.1: the test data is all pixels). Here that is 73 CPU-s an image (module docstring).
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
    "same" padding: it covers ``h * stride`` pixels, cropped as in ``cam.cam_to_image_size``); for
    ``"rgb"`` pass the ``(3, H, W)`` image with stride 1. Returns ``(C, H, W) float32``.
    """
    if raw.ndim != 3:
        raise ValueError(f"expected activations of shape (C, h, w), got {tuple(raw.shape)}")
    up = raw.float() if stride == 1 else cam_to_image_size(raw.float(), stride, image_hw, image_hw)
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
    label = np.asarray(classes, dtype=np.uint8)[decision.argmax(axis=0)]
    return label, decision, classes


# --------------------------------------------------------------------------------------------
# One image, as run in a worker process (the backbone is loaded once per process)


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


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The sampling RNG of one image: the same draws whatever order or process runs it."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def _result(image_id: str, rgb: np.ndarray, sample_label: np.ndarray, cfg: SVMConfig,
            sample_file: Path | str) -> LabelResult:
    """Features, SVM and the ``LabelResult`` of one image; ``sample_file`` gave the sample labels."""
    if (sample_label == IGNORE_INDEX).all():
        return LabelResult(image_id, error=f"{sample_file}: no pixel of {image_id} to sample (all 255 or unsure)")
    features = layer_features(rgb, cfg.layer, cfg.backbone)
    grid = cfg.rbf_grid_side if cfg.kernel == "rbf" else 0
    label, decision, classes = svm_expand(features, sample_label, cfg.n_samples, _image_rng(cfg.seed, image_id),
                                          cfg.kernel, cfg.svm_c, grid)
    scores = softmax_scores(decision) if len(classes) > 1 else np.ones_like(decision)
    return LabelResult(image_id, label=label, scores=downsample_scores(scores, cfg.score_max_side),
                       score_classes=classes)


@dataclass(frozen=True)
class _Job:
    """One image for a worker process (picklable; a seed source is read by the parent)."""

    image_id: str
    image_path: Path
    allowed: tuple[int, ...]  # background + the image's labels: the only classes ever sampled
    mask_path: Path | None = None  # oracle: the ground truth
    scores: np.ndarray | None = None  # seed: (K, h, w) float32 source scores ...
    score_classes: tuple[int, ...] = ()
    label: np.ndarray | None = None  # ... or, without scores, the (H, W) uint8 source label map
    source_file: str = ""  # seed: names the source in messages
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
    return _result(job.image_id, rgb, sample_label, cfg, job.mask_path)


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
    return _result(job.image_id, rgb, sample_label, cfg, job.source_file)


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


@register("svm-oracle", kind="method", config=SVMConfig, title="SVM (oracle, ground truth)", oracle=True)
def run_oracle(cfg: SVMConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """USES GROUND TRUTH: per-image SVM trained on pixels labelled by ``item.mask_path`` (Fig. 5.b).

    The paper's upper bound of the expansion, not a WSSS method. One result per ``ctx.todo``
    image, in order, computed in ``ctx.processes`` worker processes; a bad image or mask yields
    ``LabelResult(error=...)`` naming the file.
    """
    threads = 1 if ctx.processes > 1 else 0  # one torch thread per worker process: no oversubscription
    jobs = (_Job(it.image_id, it.image_path, (0, *it.labels), mask_path=it.mask_path, threads=threads)
            for it in ctx.todo)
    yield from run_jobs(_oracle_job, jobs, ctx.processes, cfg)


@register("svm", kind="refine", config=SVMSeedConfig, title="SVM (seed)")
def run_seed(cfg: SVMSeedConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Expand the source variant (e.g. CAM) with a per-image SVM trained on its confident regions.

    One result per ``ctx.todo`` image, in order, computed in ``ctx.processes`` worker processes;
    a bad image or unreadable source yields ``LabelResult(error=...)`` naming the file.
    """
    if ctx.source is None:
        raise ValueError("svm is a refinement: the run needs a source variant (ctx.source is None)")
    threads = 1 if ctx.processes > 1 else 0
    jobs = (_seed_source(ctx, it, threads) for it in ctx.todo)
    yield from run_jobs(_seed_job, jobs, ctx.processes, cfg)
