"""AffinityNet + random walk (refinement ``random-walk``): a variant's class scores spread along
learned pixel affinities (ISLE Sec. 3, Algorithm 1, step 1; isim Sec. 3.2 and 4.1.6).

- PSA: Ahn & Kwak, CVPR 2018, Sec. 3: AffinityNet (three backbone levels, each 1x1 conv + ELU to
  64/128/256 channels, fused by a 1x1 conv + ELU; ``network/resnet38_aff.py``), affinity
  ``a_ij = exp(-mean_c |f_i - f_j|)`` on pixel pairs closer than the radius (5), losses on positive
  foreground, positive background and negative pairs weighted 1/4, 1/4, 1/2 (``train_aff.py``),
  random walk with ``T = A^beta`` column-normalised, applied ``2^logt`` times (``infer_aff.py``).
- IRN: Ahn, Cho & Kwak, CVPR 2019, code: affinity labels from CAMs thresholded at 0.30 and 0.05,
  each refined by a label dCRF (``step/cam_to_ir_label.py``), ``beta`` 10, ``exp_times`` 8, and the
  read-out: walked scores over their maximum against background 0.25 (``make_sem_seg_labels.py``).

In: the source's scores ``(K, h, w)`` (class 0 = background, dropped) or, without scores, its label
map (its own affinity label; its one-hot map is walked). Affinity labels ``(h', w') uint8`` are
stored in chunks in the model dir; AffinityNet trains resumably (``engine.ops.training``), keyed by
the training settings and the source variant; walks of the stride-8 grid run on worker processes.
Out: label ``(H, W) uint8``, scores ``(K + 1, h, w) float16``.

Deviation, for 2 CPU cores: ImageNet EfficientNet-Lite0 trunk (PSA ResNet-38, IRN ResNet-50), only
its last two block stages train, crops of 256 (IRN 512), affinity-label dCRFs at a long side of
160. ``normalise="per_class"`` is this workbench's read-out option. ``PAPER_PARAMS`` is one flag
away. Measurements: docs/methods/random_walk.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cache.classes import IGNORE_INDEX
from engine.core.dataset import label_image_file, read_image
from engine.core.registry import Offer, Role, inference, register, training_key
from engine.core.types import ImageError, Item, LabelResult, RunContext
from engine.ops.augment import augment_with_label
from engine.ops.backbone import FeatureExtractor, freeze_batchnorm, load_feature_extractor, to_input
from engine.ops.cams import cams_to_label, with_background
from engine.ops.checkpoints import chunked_labels
from engine.ops.crf import IRN_LABEL_DCRF, refine_pseudo_label, scaled_dcrf
from engine.ops.pool import open_pool, run_jobs
from engine.ops.scores import argmax_label, downsample_scores, resize_channels, strided_to_image
from engine.ops.training import ParamGroup, Training, batch_draw, poly_lr, readable, sgd, train_resumable, trained_model

FAMILY = "affinitynet"  # ctx.model_dir family of the trained AffinityNet and its affinity labels
STRIDE = 8  # AffinityNet's output stride (PSA)
LABEL_CHUNK = 64  # images per stored affinity-label file
NORMALISE = ("global", "per_class")


@dataclass(frozen=True)
class RandomWalkConfig:
    """Settings of the AffinityNet random walk; names as in PSA/IRN. Defaults fit 2 CPU cores
    (docs/methods/random_walk.md); a variant that changes only read-out settings reuses the
    trained AffinityNet and only walks. ``PAPER_PARAMS`` for paper scale."""

    # Affinity labels (IRN cam_to_ir_label; isim Sec. 4.1.6 uses 0.3 and 0.1)
    conf_fg_thres: float = 0.30
    conf_bg_thres: float = 0.05
    label_side: int = 160  # long side at which the two label dCRFs run (~0.05 s each on 2 cores)
    # AffinityNet training (PSA train_aff.py, IRN train_irn.py, isim Sec. 4.1.6)
    backbone: str = "efficientnet_lite0"
    frozen_stages: int = 6  # stem + block stages 0-4 keep ImageNet weights; 5 and 6 train
    radius: int = 5
    epochs: int = 3  # IRN, isim: 3; PSA: 8
    batch_size: int = 16  # IRN, isim: 16
    crop_size: int = 256  # PSA: 448, IRN and isim: 512
    resize_long: tuple[int, int] = (256, 384)  # random long side before the crop (IRN: 320-640)
    lr: float = 0.01  # trained backbone stages
    head_lr_mult: float = 10.0  # the new 1x1 layers learn 10x faster (PSA from_scratch_layers)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    checkpoint_every: int = 20  # steps; also at every epoch end
    # Random walk and read-out (IRN make_sem_seg_labels)
    beta: float = inference(10.0)
    exp_times: int = inference(8)  # the transition matrix is applied 2 ** exp_times times
    sem_seg_bg_thres: float = inference(0.25)
    # "global": walked scores over their overall maximum (IRN); "per_class": each class over its
    # own maximum, as CAMs are normalised (``ops.cams.normalise_cams``; docs/methods/random_walk.md).
    normalise: str = inference("global")
    infer_max_side: int = inference(512)  # images are walked at their size, shrunk to this long side if larger
    score_max_side: int = inference(128)  # stored scores are downsampled so max(h, w) <= this

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf_bg_thres < self.conf_fg_thres <= 1.0:
            raise ValueError(f"need 0 <= conf_bg_thres < conf_fg_thres <= 1, got {self.conf_bg_thres}, "
                             f"{self.conf_fg_thres}")
        if self.radius < 2:
            raise ValueError(f"radius must be >= 2 (pairs of neighbours), got {self.radius}")
        if self.normalise not in NORMALISE:
            raise ValueError(f"normalise must be one of {NORMALISE}, got {self.normalise!r}")
        if self.exp_times < 0 or self.beta <= 0:
            raise ValueError(f"need exp_times >= 0 and beta > 0, got {self.exp_times}, {self.beta}")
        if self.crop_size % STRIDE or self.crop_size < STRIDE * self.radius:
            raise ValueError(f"crop_size must be a multiple of {STRIDE} and >= {STRIDE * self.radius}, "
                             f"got {self.crop_size}")
        for name in ("label_side", "epochs", "batch_size", "infer_max_side", "score_max_side", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


PAPER_PARAMS: dict[str, Any] = {"frozen_stages": 1, "crop_size": 512, "resize_long": (320, 640), "label_side": 512}


# ---------------------------------------------------------------------------------------------
# Numerics: arrays in, arrays out


def affinity_label(fg_conf: np.ndarray, bg_conf: np.ndarray) -> np.ndarray:
    """Combine the two confident label maps (IRN ``cam_to_ir_label``; PSA Sec. 3).

    fg_conf: ``(H, W) uint8``, CAMs thresholded at the high (foreground) threshold, dCRF-refined;
    bg_conf: the same at the low threshold. Returns ``(H, W) uint8``: ``fg_conf``'s class where it
    is foreground, 0 where both are background, 255 (ignore) where only the low threshold found
    an object (the uncertain band between the thresholds).
    """
    if fg_conf.shape != bg_conf.shape:
        raise ValueError(f"label maps of different shapes {fg_conf.shape} and {bg_conf.shape}")
    label = np.where(fg_conf != 0, fg_conf, IGNORE_INDEX).astype(np.uint8)
    label[(fg_conf == 0) & (bg_conf == 0)] = 0
    return label


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """PSA's pair window: every ``(dy, dx)`` with ``0 < dy^2 + dx^2 < radius^2``, one of each
    opposite pair (``dy > 0``, or ``dy == 0`` and ``dx > 0``); 34 offsets for radius 5."""
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return offsets


def _pair_slices(height: int, width: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of the pixels ``i`` and their partners ``i + (dy, dx)`` that are both in the grid."""
    rows, cols = slice(0, height - dy), slice(max(0, -dx), width - max(0, dx))
    return (rows, cols), (slice(dy, height), slice(max(0, dx), width + min(0, dx)))


def pair_affinities(features: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``a_ij = exp(-mean_c |f_i - f_j|)`` (PSA) for every pixel ``i`` and ``j = i + (dy, dx)``.

    features: ``(B, C, h, w) float32``. Returns ``(B, h - dy, w - |dx|) float32`` in (0, 1].
    """
    (rows, cols), (rows_to, cols_to) = _pair_slices(*features.shape[2:], dy, dx)
    return torch.exp(-(features[:, :, rows, cols] - features[:, :, rows_to, cols_to]).abs().mean(dim=1))


def affinity_loss(features: torch.Tensor, label: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """PSA's affinity loss over the pairs of ``offsets``: ``L_fg+ / 4 + L_bg+ / 4 + L- / 2``.

    features: ``(B, C, h, w) float32``; label: ``(B, h, w) int64`` affinity labels at the feature
    grid (255 = ignore). A pair of two labelled pixels is positive-background (both 0),
    positive-foreground (the same class) or negative (different labels); each loss is the mean
    of ``-log(a)`` (positives) or ``-log(1 - a)`` (negatives) over its pairs (PSA ``train_aff.py``,
    with its 1e-5 guards). Returns a scalar tensor.
    """
    if features.ndim != 4 or label.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(f"expected features (B, C, h, w) and label (B, h, w), got {tuple(features.shape)}, "
                         f"{tuple(label.shape)}")
    sums = torch.zeros(3, dtype=features.dtype, device=features.device)  # bg+, fg+, neg
    counts = torch.zeros(3, dtype=features.dtype, device=features.device)
    for dy, dx in offsets:
        (rows, cols), (rows_to, cols_to) = _pair_slices(*label.shape[1:], dy, dx)
        here, there = label[:, rows, cols], label[:, rows_to, cols_to]
        valid = (here != IGNORE_INDEX) & (there != IGNORE_INDEX)
        same = valid & (here == there)
        masks = torch.stack([same & (here == 0), same & (here != 0), valid & (here != there)]).to(features.dtype)
        aff = pair_affinities(features, dy, dx)
        losses = torch.stack([-torch.log(aff + 1e-5), -torch.log(aff + 1e-5), -torch.log(1.0 + 1e-5 - aff)])
        sums = sums + (masks * losses).flatten(1).sum(dim=1)
        counts = counts + masks.flatten(1).sum(dim=1)
    means = sums / (counts + 1e-5)
    return means[0] / 4 + means[1] / 4 + means[2] / 2


def affinity_matrix(features: np.ndarray, radius: int) -> scipy.sparse.csr_matrix:
    """The symmetric affinity matrix of one image's feature grid (PSA ``forward(to_dense=True)``).

    features: ``(C, h, w) float32``. Returns an ``(h*w, h*w)`` float64 sparse matrix holding
    ``a_ij`` for every pair closer than ``radius`` (both directions) and 1 on the diagonal; pixel
    ``(y, x)`` is index ``y * w + x``.
    """
    f = torch.from_numpy(np.asarray(features, dtype=np.float32))[None]
    height, width = f.shape[2:]
    index = np.arange(height * width).reshape(height, width)
    rows, cols, values = [index.ravel()], [index.ravel()], [np.ones(height * width)]
    for dy, dx in pair_offsets(radius):
        if dy >= height or abs(dx) >= width:
            continue
        (r, c), (r_to, c_to) = _pair_slices(height, width, dy, dx)
        aff = pair_affinities(f, dy, dx)[0].numpy().ravel().astype(np.float64)
        here, there = index[r, c].ravel(), index[r_to, c_to].ravel()
        rows += [here, there]
        cols += [there, here]
        values += [aff, aff]
    n = height * width
    return scipy.sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def transition_matrix(affinity: scipy.sparse.spmatrix, beta: float) -> scipy.sparse.csr_matrix:
    """``T = A^beta`` (element-wise) with every column divided by its sum (PSA ``infer_aff.py``,
    IRN ``to_transition_matrix``): ``v @ T`` moves each pixel's score to a weighted mean of its
    neighbours'. affinity: ``(N, N)`` non-negative, no empty column. Returns ``(N, N)`` float64 CSR."""
    powered = scipy.sparse.csr_matrix(affinity, dtype=np.float64, copy=True)
    powered.data **= beta
    column_sums = np.asarray(powered.sum(axis=0)).ravel()
    if (column_sums <= 0).any():
        raise ValueError("affinity matrix has an empty column; every pixel needs its own (diagonal) affinity")
    return scipy.sparse.csr_matrix(powered @ scipy.sparse.diags(1.0 / column_sums))


def random_walk(scores: np.ndarray, transition: scipy.sparse.spmatrix, exp_times: int) -> np.ndarray:
    """``scores @ T^(2^exp_times)`` (PSA Sec. 3, IRN ``propagate_to_edge``).

    scores: ``(K, h, w)`` float, ``h * w == N``; transition: ``(N, N)`` from ``transition_matrix``.
    Applies ``T`` ``2 ** exp_times`` times to the score vectors instead of squaring ``T`` (the
    references' dense ``T @ T``): the same product, sparse. Returns ``(K, h, w) float32``.
    """
    k, height, width = scores.shape
    if transition.shape != (height * width, height * width):
        raise ValueError(f"transition of shape {transition.shape} for a {height}x{width} grid")
    walked = np.ascontiguousarray(np.asarray(scores, dtype=np.float32).reshape(k, -1).T)  # (N, K)
    backward = scipy.sparse.csr_matrix(transition.T, dtype=np.float32)
    for _ in range(2 ** exp_times):
        walked = backward @ walked
    return walked.T.reshape(k, height, width).astype(np.float32)


def walk_to_label(walked: np.ndarray, classes: Sequence[int], bg_threshold: float,
                  normalise: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """IRN's read-out: normalised foreground scores against a constant background, argmax.

    walked: ``(K, H, W)`` float, the walked scores of the object ``classes``. ``normalise`` "global"
    divides by their overall maximum (IRN ``make_sem_seg_labels``), "per_class" each class by its
    own maximum. Returns the label ``(H, W) uint8`` (``cams_to_label`` at ``bg_threshold``) and
    the scores ``(K + 1, H, W) float32`` (channel 0 the background constant). A class whose walk is
    all zero stays 0; all-zero scores give all background.
    """
    walked = np.asarray(walked, dtype=np.float32)
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {NORMALISE}, got {normalise!r}")
    axes = (0, 1, 2) if normalise == "global" else (1, 2)
    peak = walked.max(axis=axes, keepdims=True) if walked.size else np.zeros((1, 1, 1), np.float32)
    normed = np.divide(walked, peak, out=np.zeros_like(walked), where=peak > 0)
    return cams_to_label(normed, classes, bg_threshold), with_background(normed, bg_threshold)


def scores_on_grid(scores: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """Source scores ``(K, h, w)`` (covering the ``image_hw`` image) averaged over the ``STRIDE``-pixel
    cells of a ``grid_hw`` feature grid, which covers ``grid * STRIDE`` pixels from the top left
    (the network pads the bottom/right). Returns ``(K, gh, gw) float32``; padding counts as 0."""
    height, width = image_hw
    full = torch.from_numpy(resize_channels(scores, height, width))
    pad = (0, grid_hw[1] * STRIDE - width, 0, grid_hw[0] * STRIDE - height)
    if min(pad) < 0:
        raise ValueError(f"a {grid_hw} grid at stride {STRIDE} does not cover a {image_hw} image")
    return F.avg_pool2d(F.pad(full, pad)[None], STRIDE)[0].numpy()


def grid_label(label: np.ndarray) -> np.ndarray:
    """Affinity labels of a crop ``(c, c) uint8`` sampled at the centres of its ``STRIDE`` cells:
    ``(c / STRIDE, c / STRIDE)``, the grid of the AffinityNet features."""
    return label[STRIDE // 2 :: STRIDE, STRIDE // 2 :: STRIDE]


# ---------------------------------------------------------------------------------------------
# Model


class AffinityNet(nn.Module):
    """PSA's AffinityNet on an EfficientNet-Lite trunk.

    forward: ``(B, 3, H, W) float32`` (``to_input``) -> ``(B, 448, ceil(H / 8), ceil(W / 8))`` features:
    the outputs of block stages 2 (stride 8), 4 and 6 (stride 16 with the last stage dilated)
    each go through a 1x1 conv + ELU to 64, 128 and 256 channels, are resized to the stride-8
    grid, concatenated and fused by a 1x1 conv + ELU (PSA ``resnet38_aff.py``: conv4, conv5, bn7).
    The first ``frozen_stages`` trunk stages run without gradients; batch norm stays ImageNet's.
    """

    LEVELS = (3, 5, 7)  # indices into FeatureExtractor.stages (stem, blocks 0-6, head)
    WIDTHS = (64, 128, 256)

    def __init__(self, features: FeatureExtractor, frozen_stages: int, generator: torch.Generator):
        super().__init__()
        self.trunk = nn.ModuleList(features.stages[: self.LEVELS[-1] + 1])
        self.frozen_stages = frozen_stages
        for stage in list(self.trunk)[:frozen_stages]:
            stage.requires_grad_(False)
        with torch.no_grad():
            channels = [out.shape[1] for out in self._levels(torch.zeros(1, 3, 64, 64))]
        self.project = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(channels, self.WIDTHS))
        self.fuse = nn.Conv2d(sum(self.WIDTHS), sum(self.WIDTHS), 1, bias=False)
        for conv in self.project:
            nn.init.kaiming_normal_(conv.weight, generator=generator)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4, generator=generator)

    def _levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for index, stage in enumerate(self.trunk):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.frozen_stages):
                x = stage(x)
            if index in self.LEVELS:
                levels.append(x)
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self._levels(x)
        size = levels[0].shape[2:]
        projected = [F.elu(conv(level)) for conv, level in zip(self.project, levels)]
        projected = [p if p.shape[2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                     for p in projected]
        return F.elu(self.fuse(torch.cat(projected, dim=1)))

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        freeze_batchnorm(self.modules())
        return self


def build_net(cfg: RandomWalkConfig) -> AffinityNet:
    """``AffinityNet`` with ImageNet trunk weights and new layers initialised from ``cfg.seed``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return AffinityNet(load_feature_extractor(cfg.backbone, output_stride=16), cfg.frozen_stages, generator)


# ---------------------------------------------------------------------------------------------
# Affinity labels, one image per worker process


@dataclass(frozen=True)
class _LabelJob:
    image_id: str
    image_path: Path
    classes: tuple[int, ...]  # foreground classes of the scores
    scores: np.ndarray | None  # (K, h, w) float32 foreground scores, or None: use ``label``
    label: np.ndarray | None  # (H, W) uint8 source label map when the source kept no scores


def _shrunk_size(shape: tuple[int, ...], side: int) -> tuple[tuple[int, int], float]:
    """``((width, height), scale)`` of an ``(H, W, ...)`` array with its long side cut to ``side``."""
    height, width = shape[:2]
    scale = min(1.0, side / max(height, width))
    return (max(1, round(width * scale)), max(1, round(height * scale))), scale


def _shrink_image(rgb: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The image with its long side at most ``side`` (bilinear) and the scale applied."""
    size, scale = _shrunk_size(rgb.shape, side)
    if scale == 1.0:
        return rgb, 1.0
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)), scale


def _label_job(job: _LabelJob, cfg: RandomWalkConfig) -> LabelResult:
    """The affinity label of one image at ``cfg.label_side``, or an error result naming the file."""
    if job.scores is None:  # a label-only source is its own affinity label, at the label size
        size, _ = _shrunk_size(job.label.shape, cfg.label_side)
        return LabelResult(job.image_id, label=np.asarray(Image.fromarray(job.label).resize(size, Image.NEAREST)))
    return label_image_file(job.image_id, job.image_path, lambda rgb: _confident_label(rgb, job, cfg))


def _confident_label(rgb: np.ndarray, job: _LabelJob, cfg: RandomWalkConfig) -> LabelResult:
    """IRN's two thresholded, dCRF-refined maps of one image, combined (``affinity_label``)."""
    rgb, scale = _shrink_image(rgb, cfg.label_side)
    if not job.classes:
        return LabelResult(job.image_id, label=np.zeros(rgb.shape[:2], np.uint8))
    cams = resize_channels(job.scores, *rgb.shape[:2])
    crf = scaled_dcrf(IRN_LABEL_DCRF, scale)
    fg = refine_pseudo_label(rgb, cams, job.classes, cfg.conf_fg_thres, crf)
    bg = refine_pseudo_label(rgb, cams, job.classes, cfg.conf_bg_thres, crf)
    return LabelResult(job.image_id, label=affinity_label(fg, bg))


def source_seeds(ctx: RunContext, item: Item) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray | None]:
    """What the walk starts from for one image: ``(classes, scores, label)``.

    With stored scores: their foreground channels ``(K, h, w) float32`` and class ids, label None.
    Without: the source label map ``(H, W) uint8`` (it must match the image size), scores None,
    and classes ``(0, *its foreground classes)``. Raises ``ImageError`` naming the problem.
    """
    if ctx.source is None:
        raise ValueError("random-walk is a refinement: the run needs a source variant (ctx.source is None)")
    classes, scores, label = ctx.source.read(item.image_id)
    if scores is not None:
        keep = [k for k, c in enumerate(classes) if c != 0]
        return tuple(classes[k] for k in keep), scores[keep], None
    if label.shape != (item.height, item.width):
        raise ImageError(f"source label map of {item.image_id} is {label.shape[1]}x{label.shape[0]} (WxH), "
                         f"image {item.image_path} is {item.width}x{item.height}")
    foreground = tuple(int(c) for c in np.unique(label) if c not in (0, IGNORE_INDEX))
    return (0, *foreground), None, label


def _make_label_job(ctx: RunContext, item: Item) -> _LabelJob | LabelResult:
    try:
        classes, scores, label = source_seeds(ctx, item)
    except ImageError as exc:
        return LabelResult(item.image_id, error=str(exc))
    return _LabelJob(item.image_id, item.image_path, classes, scores, label)


def affinity_labels(cfg: RandomWalkConfig, ctx: RunContext, model_dir: Path) -> dict[str, np.ndarray]:
    """``{image_id: (h, w) uint8}`` affinity labels of ``ctx.items``, stored in chunks in ``model_dir``
    (a rerun reuses them). dCRF runs on ``ctx.processes`` processes. Reports ``("affinity labels",
    done, total)``; an image whose source or file is unreadable gets no label (no training pairs)."""
    with open_pool(ctx) as pool:
        return chunked_labels(ctx.items, LABEL_CHUNK, lambda index: model_dir / f"affinity_labels_{index:04d}.npz",
                              lambda chunk: pool.map(_label_job, (_make_label_job(ctx, item) for item in chunk), cfg),
                              lambda done, total: ctx.report("affinity labels", done, total))


# ---------------------------------------------------------------------------------------------
# Training


def _batch(items: Sequence[Item], labels: dict[str, np.ndarray], cfg: RandomWalkConfig, epoch: int,
           index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Batch ``index`` of ``epoch``: crops ``(B, 3, c, c) float32`` and grid labels ``(B, c/8, c/8)
    int64``. Images without an affinity label are skipped; order and augmentation depend only on
    (seed, epoch, index), so a resumed run sees the same batches. None when the batch is empty."""
    indices, rng = batch_draw(len(items), cfg.batch_size, cfg.seed, epoch, index)
    images, grids = [], []
    for item, rgb in readable(items, [j for j in indices if items[j].image_id in labels]):
        crop, crop_label = augment_with_label(rgb, labels[item.image_id], rng, cfg.resize_long, cfg.crop_size)
        images.append(to_input(crop))
        grids.append(torch.from_numpy(grid_label(crop_label).astype(np.int64)))
    if not images:
        return None
    return torch.stack(images), torch.stack(grids)


def train(cfg: RandomWalkConfig, ctx: RunContext) -> AffinityNet:
    """Make the affinity labels, then train (or resume, or load) AffinityNet on ``ctx.items``.

    Model files live in ``ctx.model_dir("affinitynet", training key + source variant)``; the
    affinity labels are made only when there is training to do, and deleted once the model is
    final. Reports ``("affinity labels", ...)`` then ``("train", step, total)``; ``Cancelled``
    propagates. Returns the net in eval mode. Raises ``ValueError`` without training images.
    """
    if not ctx.items:
        raise ValueError("AffinityNet needs training images: ctx.items is empty")
    key = training_key(cfg, source=ctx.source.variant_id if ctx.source else None)
    model_dir = ctx.model_dir(FAMILY, key)
    net = build_net(cfg).to(ctx.device)
    steps_per_epoch = max(1, len(ctx.items) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    offsets = pair_offsets(cfg.radius)
    labels: dict[str, np.ndarray] = {}

    def groups() -> list[ParamGroup]:
        labels.update(affinity_labels(cfg, ctx, model_dir))  # only when there is training to do
        return [ParamGroup([p for p in net.trunk.parameters() if p.requires_grad], cfg.lr),
                ParamGroup([*net.project.parameters(), *net.fuse.parameters()], cfg.lr * cfg.head_lr_mult)]

    train_resumable(net, model_dir, Training(
        name=FAMILY, key=key, total=total, steps_per_epoch=steps_per_epoch, checkpoint_every=cfg.checkpoint_every,
        groups=groups, optimizer=sgd(cfg.momentum, cfg.weight_decay),
        lr=lambda step, base: poly_lr(base, step, total, cfg.poly_power),
        batch=lambda step: _batch(ctx.items, labels, cfg, *divmod(step, steps_per_epoch)),
        loss=lambda batch: affinity_loss(net(batch[0].to(ctx.device)), batch[1].to(ctx.device), offsets),
        report=lambda done: ctx.report("train", done, total), device=ctx.device, prefetch=True))
    for path in model_dir.glob("affinity_labels_*.npz"):
        path.unlink()  # the model is final; the labels are only training input
    return net


# ---------------------------------------------------------------------------------------------
# Random walk of one image


def walk_grid(features: np.ndarray, seeds: np.ndarray, image_hw: tuple[int, int], out_hw: tuple[int, int],
              cfg: RandomWalkConfig) -> np.ndarray:
    """Random walk of seed scores along the affinities of one feature grid.

    features: ``(C, gh, gw) float32`` AffinityNet output for an image of size ``image_hw``;
    seeds: ``(K, h, w)`` float scores covering that image (any resolution). The seeds are pooled
    onto the grid, walked (``affinity_matrix``, ``transition_matrix``, ``random_walk``) and
    upsampled to ``out_hw``. Returns ``(K, *out_hw) float32 >= 0``.
    """
    grid = scores_on_grid(seeds, image_hw, features.shape[1:])
    walked = random_walk(grid, transition_matrix(affinity_matrix(features, cfg.radius), cfg.beta), cfg.exp_times)
    return strided_to_image(torch.from_numpy(walked), STRIDE, image_hw, out_hw).numpy()


@dataclass(frozen=True)
class _WalkJob:
    """One image's walk, run in a worker process (picklable): the features come from the parent."""

    image_id: str
    features: np.ndarray  # (C, gh, gw) float32
    image_hw: tuple[int, int]  # size of the image the features were computed on
    out_hw: tuple[int, int]  # the original image size
    classes: tuple[int, ...]
    scores: np.ndarray | None  # (K, h, w) float32 foreground scores, or None: walk ``label``
    label: np.ndarray | None  # (H, W) uint8 source label map


def _walk_job(job: _WalkJob, cfg: RandomWalkConfig) -> LabelResult:
    """The random-walk pseudo-label of one image with its scores ``(K + 1, h, w) float16``.

    Scored source: IRN's read-out (``walk_to_label``). Label-only source: the one-hot label map
    (255 = no seed) is walked over background and its classes, and the label is the argmax.
    """
    if job.scores is not None:
        walked = (walk_grid(job.features, job.scores, job.image_hw, job.out_hw, cfg) if job.classes
                  else np.zeros((0, *job.out_hw), np.float32))
        label, scores = walk_to_label(walked, job.classes, cfg.sem_seg_bg_thres, cfg.normalise)
        score_classes = (0, *job.classes)
    else:
        one_hot = (job.label[None] == np.asarray(job.classes, dtype=np.uint8)[:, None, None]).astype(np.float32)
        scores = walk_grid(job.features, one_hot, job.image_hw, job.out_hw, cfg)
        label = argmax_label(scores, job.classes)
        score_classes = job.classes
    return LabelResult(job.image_id, label=label, scores=downsample_scores(scores, cfg.score_max_side),
                       score_classes=score_classes)


@torch.no_grad()
def _make_walk_job(net: AffinityNet, ctx: RunContext, item: Item, cfg: RandomWalkConfig) -> _WalkJob | LabelResult:
    """Read one image and its source and run AffinityNet on it (in this process, on ``ctx.device``)."""
    try:
        rgb = read_image(item.image_path)
        classes, scores, label = source_seeds(ctx, item)
    except ImageError as exc:
        return LabelResult(item.image_id, error=str(exc))
    small, _ = _shrink_image(rgb, cfg.infer_max_side)
    features = net(to_input(small)[None].to(ctx.device))[0].float().cpu().numpy()
    return _WalkJob(item.image_id, features, small.shape[:2], rgb.shape[:2], classes, scores, label)


@register("random-walk", role=Role.REFINEMENT, config=RandomWalkConfig, title="random walk",
          offers={Offer.QUEUE}, needs_background=True)
def run(cfg: RandomWalkConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train AffinityNet on the source variant (or load it), then walk each ``ctx.todo`` image.

    AffinityNet runs in this process; the sparse walks run on ``ctx.processes`` worker processes
    (in-process when 1). The worker records each result as it comes, so a killed walk resumes at
    the first unfinished image.
    """
    net = trained_model(train, cfg, ctx)
    yield from run_jobs(_walk_job, (_make_walk_job(net, ctx, item, cfg) for item in ctx.todo), ctx, cfg)
