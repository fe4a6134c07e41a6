"""CAM baseline: class activation maps of an image-level classifier, thresholded into pseudo-labels.

First stage of the pipeline (method ``"cam"``): image-level labels -> ``LabelResult`` per image
with a label map and the class scores it came from; refinements (``engine/refine/``, e.g. dCRF)
start from these.

Papers:
- CAM: Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016, Sec. 2
  (global average pooling + linear classifier; a class's map is the classifier weights applied
  to every feature-map position).
- PSA: Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision", CVPR
  2018, Sec. 3.1 and 4.1 (multi-label soft-margin loss, random rescale/flip/crop, multi-scale
  and flipped inference, background score as a constant).
- IRN: Ahn, Cho & Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
  Relations", CVPR 2019, Sec. 4 and its code (``net/resnet50_cam.py``, ``step/make_cam.py``,
  ``step/eval_cam.py``): output stride 16, bias-free 1x1 classifier, ReLU, sum over scales and
  flips, per-class max normalisation (``/ (max + 1e-5)``), argmax against a constant background
  threshold (``cam_eval_thres`` = 0.15).
- isim: Bircanoglu & Arica, iterative self-improved model for WSSS
  (shared/papers/isim-iterative-self-improved.md), Sec. 3.2 (CAM
  branch: GAP + 1x1 conv after the encoder, multi-label soft-margin loss) and Sec. 4.1
  (preprocessing: random rescale, flip, crop; CAMs at scales 1, 0.5, 1.5, 2 with flips;
  pseudo-ground-truth by thresholding the CAMs at 0.3).

Data flow:
    train:  ``ctx.items`` (rgb (H, W, 3) uint8, labels) -> augment -> ``(B, 3, c, c) float32``
            -> ``CAMNet`` -> ``(B, 20)`` logits, MultiLabelSoftMarginLoss; checkpoints in
            ``ctx.model_dir("cam", training settings)``.
    infer:  rgb -> ``multiscale_cams`` ``(K, H, W) float32 >= 0`` (K = image classes)
            -> ``normalise_cams`` ``[0, 1]`` -> ``cams_to_label`` ``(H, W) uint8``;
            scores ``(K + 1, h, w) float16`` (channel 0 = background) via ``downsample_scores``.

Defaults, measured on the bundled voc2012-animals train split (1,861 images) on 2 CPU cores that
other jobs shared (load ~2):
    training   2 epochs x 116 steps: 400-500 s wall; 1 epoch took 185 s wall and 371 CPU-s, so
               ~370 s with both cores free (1.6 s a step; 2.4 s with only the stem frozen)
    inference  0.19-0.24 s/image (scales 1.0 and 0.5 with flips, scores included)
    train mIoU over 300 train images (every 6th; 14 classes occur in them; IoU against
    SegmentationClassAug, 255 ignored), by background threshold:
        bg_threshold      0.05  0.10  0.15  0.20  0.25  0.30  0.35  0.40  0.50
        defaults          26.4  29.0  30.7  31.7  32.1  32.3  32.1  31.5  29.1
    The curve is flat between 0.2 and 0.35; 0.3 (isim Sec. 4.1) is the default, 1.6 points over
    IRN's 0.15 (tuned there for ResNet-50 CAMs trained 5 epochs on trainaug). At 0.3:
    background 67.7, cat 59.1, dog 42.0, person 37.4. Other settings, same 300 images, best
    threshold: lr 0.01 -> 30.4, lr 0.04 -> 31.0; 1 epoch with 4 frozen stages (185 s) -> 26.1;
    1 epoch with only the stem frozen (280 s) -> 25.1 (so freezing costs nothing per step and buys
    the second epoch). For comparison, isim Table 2 reports 48.9 for a ResNet-50 CAM on trainaug.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cache.voc import IGNORE_INDEX
from engine.backbone import FeatureExtractor, freeze_batchnorm, load_feature_extractor, to_input
from engine.checkpoints import train_resumable
from engine.dataset import label_each, read_image
from engine.registry import config_to_params, register
from engine.types import ImageError, Item, LabelResult, RunContext

NUM_FOREGROUND = 20  # VOC classes 1-20; class id c is classifier row c - 1
PAD_VALUE = 128  # uint8 fill for crops larger than the image: ~0 after to_input, like IRN's zero padding
FAMILY = "cam"  # ctx.model_dir family; the files are cam_checkpoint.pt (during training), cam_model.pt (done)


@dataclass(frozen=True)
class CAMConfig:
    """Settings of the CAM baseline. Defaults fit the CPU budget of this workbench.

    Defaults (2 CPU cores, 1,861 train images): ~6 min of training (2 epochs of 116 steps at
    batch 16 on 256 crops, about 1.6 s a step with the first 4 stages frozen) and ~0.2 s/image
    of inference (scales 1.0 and 0.5 with flips); train mIoU 32.3 (module docstring).

    The paper-scale settings (IRN/isim: 5 epochs, 512 crops from images rescaled to a long side of
    320-640, scales 1.0, 0.5, 1.5, 2.0 with flips) are ``PAPER_PARAMS``:
    ``registry.get("cam").make_config(PAPER_PARAMS)``; on these cores that is hours, not minutes.
    """

    backbone: str = "efficientnet_lite0"  # engine.backbone.BACKBONES key (ImageNet weights)
    output_stride: int = 16  # IRN: last stage dilated, CAMs at 1/16 (isim Sec. 3.2.1)
    # Stem + block stages 0-2 (down to stride 8) keep their ImageNet weights and run without
    # gradients: on 2 CPU cores their high-resolution backward pass costs ~1/3 of a step, and
    # edge/texture filters barely change in 2 epochs (IRN likewise freezes ResNet-50's conv1);
    # measured: 1 epoch frozen this way scores 26.1 mIoU vs 25.1 with only the stem frozen.
    # 1 = only the stem (as IRN), 0 = train everything. BN statistics are always frozen (IRN).
    frozen_stages: int = 4
    epochs: int = 2
    batch_size: int = 16  # IRN/PSA: 16
    crop_size: int = 256  # IRN: 512, isim: 320
    resize_long: tuple[int, int] = (256, 512)  # random long side before the crop (IRN: 320, 640)
    lr: float = 0.02  # backbone (0.01 and 0.04 scored lower)
    classifier_lr_mult: float = 10.0  # the new classifier learns 10x faster (PSA/IRN)
    momentum: float = 0.9  # isim Sec. 4.1 (IRN's PolyOptimizer runs plain SGD at lr 0.1)
    weight_decay: float = 1e-4  # IRN
    poly_power: float = 0.9  # lr * (1 - step / total) ** power (DeepLab "poly", PSA/IRN)
    seed: int = 0  # classifier init, data order and augmentation are derived from it
    checkpoint_every: int = 20  # steps; also at every epoch end
    scales: tuple[float, ...] = (1.0, 0.5)  # IRN/isim: (1.0, 0.5, 1.5, 2.0)
    flip: bool = True  # add horizontally flipped copies at every scale
    bg_threshold: float = 0.3  # constant background score (isim: 0.3, IRN: 0.15); module docstring
    score_max_side: int = 128  # stored scores are downsampled so max(h, w) <= this


PAPER_PARAMS: dict[str, Any] = {
    "frozen_stages": 1,
    "epochs": 5,
    "crop_size": 512,
    "resize_long": (320, 640),
    "scales": (1.0, 0.5, 1.5, 2.0),
}
_INFERENCE_FIELDS = ("scales", "flip", "bg_threshold", "score_max_side")


# --------------------------------------------------------------------------------------------
# Numerics (pure functions)


def normalise_cams(cams: np.ndarray) -> np.ndarray:
    """Per-class max normalisation (IRN ``make_cam``: ``cam / (max + 1e-5)``).

    cams: ``(K, H, W) float32 >= 0`` (ReLU'd CAMs). Returns ``(K, H, W) float32`` in [0, 1); a class
    whose map is all zero stays zero.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"expected cams of shape (K, H, W), got {cams.shape}")
    if cams.shape[0] == 0:
        return cams.copy()
    peak = cams.reshape(cams.shape[0], -1).max(axis=1)
    return cams / (peak[:, None, None] + np.float32(1e-5))


def cams_to_label(cams: np.ndarray, classes: Sequence[int], threshold: float) -> np.ndarray:
    """Pseudo-label by argmax over ``[threshold, cams]`` (IRN ``eval_cam``; isim Sec. 4.1 step ii).

    cams: ``(K, H, W) float32`` in [0, 1], channel k for class id ``classes[k]`` (1-20).
    threshold: the constant background score; a pixel is background unless some class
        exceeds it (ties go to background).
    Returns ``(H, W) uint8`` with values in ``{0, *classes}``.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(
            f"expected cams of shape ({len(classes)}, H, W) for classes {tuple(classes)}, got {cams.shape}")
    if any(not 1 <= c <= NUM_FOREGROUND for c in classes):
        raise ValueError(f"class ids must be 1-{NUM_FOREGROUND}, got {tuple(classes)}")
    background = np.full((1, *cams.shape[1:]), threshold, dtype=np.float32)
    keys = np.array([0, *classes], dtype=np.uint8)
    return keys[np.argmax(np.concatenate([background, cams]), axis=0)]


def select_classes(class_maps: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Keep only the image's classes: ``(B, 20, h, w)`` -> ``(B, K, h, w)``, channel k = ``classes[k]``."""
    if class_maps.ndim != 4 or class_maps.shape[1] != NUM_FOREGROUND:
        raise ValueError(f"expected class maps of shape (B, {NUM_FOREGROUND}, h, w), got {tuple(class_maps.shape)}")
    if any(not 1 <= c <= NUM_FOREGROUND for c in classes):
        raise ValueError(f"class ids must be 1-{NUM_FOREGROUND}, got {tuple(classes)}")
    return class_maps[:, [c - 1 for c in classes]]


def cam_to_image_size(cam: torch.Tensor, stride: int, scaled_hw: tuple[int, int],
                      image_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample a CAM of a rescaled image back onto the original image grid.

    cam: ``(K, h, w) float32``, computed with ``stride`` on an image resized to ``scaled_hw``; the
    feature map covers ``h * stride`` scaled pixels (the network pads the bottom/right), so it is
    upsampled to that extent in original pixels and cropped (IRN's ``strided_up_size`` crop).
    Returns ``(K, H, W) float32``, ``(H, W) = image_hw``.
    """
    (height, width), (sh, sw) = image_hw, scaled_hw
    if cam.ndim != 3:
        raise ValueError(f"expected a CAM of shape (K, h, w), got {tuple(cam.shape)}")
    out_h = max(height, round(cam.shape[1] * stride * height / sh))
    out_w = max(width, round(cam.shape[2] * stride * width / sw))
    up = F.interpolate(cam[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    return up[:, :height, :width]


def downsample_scores(scores: np.ndarray, max_side: int) -> np.ndarray:
    """``(K, H, W)`` scores -> ``(K, h, w) float16`` with ``max(h, w) <= max_side`` (area average).

    Unchanged size (only the dtype) when the image already fits.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape (K, H, W), got {scores.shape}")
    height, width = scores.shape[1:]
    if max(height, width) <= max_side:
        return scores.astype(np.float16)
    scale = max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))  # long side = max_side
    small = F.interpolate(torch.from_numpy(scores)[None], size=size, mode="area")[0]
    return small.numpy().astype(np.float16)


def multilabel_target(labels: Sequence[int]) -> np.ndarray:
    """Image-level labels (class ids 1-20) -> ``(20,) float32`` multi-hot target (PSA/IRN)."""
    target = np.zeros(NUM_FOREGROUND, dtype=np.float32)
    for c in labels:
        if not 1 <= c <= NUM_FOREGROUND:
            raise ValueError(f"class ids must be 1-{NUM_FOREGROUND}, got {tuple(labels)}")
        target[c - 1] = 1.0
    return target


def augment(rgb: np.ndarray, rng: np.random.Generator, resize_long: tuple[int, int], crop_size: int) -> np.ndarray:
    """PSA/IRN training augmentation: random long-side rescale, horizontal flip, random crop.

    rgb: ``(H, W, 3) uint8``. The long side is resized to an integer drawn uniformly from
    ``resize_long`` (inclusive, bilinear), the image flipped with probability 0.5, then a
    ``crop_size`` square is cut at a random place; where the image is smaller, the crop is padded
    with ``PAD_VALUE`` (IRN ``random_crop``). Returns ``(crop_size, crop_size, 3) uint8``.
    """
    return augment_with_label(rgb, None, rng, resize_long, crop_size)[0]


def augment_with_label(rgb: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                       resize_long: tuple[int, int], crop_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``augment`` applied to an image and its pseudo-label alike (IRN/isim segmentation loaders).

    label: ``(h, w) uint8`` pseudo-label of the same image at any resolution (same aspect), or
    None. It is resized (nearest) to the rescaled image's size, flipped and cropped with it; crop
    padding is ``IGNORE_INDEX`` (255). Returns ``(crop_size, crop_size, 3) uint8`` and
    ``(crop_size, crop_size) uint8`` (or None). The random draws are those of ``augment``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    if label is not None and label.ndim != 2:
        raise ValueError(f"expected an (h, w) label, got {label.shape}")
    height, width = rgb.shape[:2]
    long_side = int(rng.integers(resize_long[0], resize_long[1] + 1))
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    height, width = image.shape[:2]
    out = np.full((crop_size, crop_size, 3), PAD_VALUE, dtype=np.uint8)
    # Offsets as in IRN: the larger of (image, crop) is cut, the smaller placed at random in it.
    dy, dx = int(rng.integers(abs(height - crop_size) + 1)), int(rng.integers(abs(width - crop_size) + 1))
    src_y, dst_y = (dy, 0) if height > crop_size else (0, dy)
    src_x, dst_x = (dx, 0) if width > crop_size else (0, dx)
    h, w = min(height, crop_size), min(width, crop_size)
    out[dst_y : dst_y + h, dst_x : dst_x + w] = image[src_y : src_y + h, src_x : src_x + w]
    if label is None:
        return out, None
    out_label = np.full((crop_size, crop_size), IGNORE_INDEX, dtype=np.uint8)
    out_label[dst_y : dst_y + h, dst_x : dst_x + w] = label[src_y : src_y + h, src_x : src_x + w]
    return out, out_label


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """DeepLab "poly" schedule used by PSA/IRN: ``base_lr * (1 - step / total_steps) ** power``."""
    return base_lr * (1 - step / total_steps) ** power


# --------------------------------------------------------------------------------------------
# Model


class CAMNet(nn.Module):
    """Backbone + global average pooling + bias-free 1x1 conv classifier (CAM Sec. 2; IRN).

    forward: ``(B, 3, H, W) float32`` (``to_input`` normalisation) -> ``(B, 20) float32`` logits.
    class_maps: same input -> ``(B, 20, H / s, W / s) float32`` raw CAMs (classifier applied at
    every position, before ReLU); ``forward`` equals their spatial mean.
    The first ``frozen_stages`` backbone stages run without gradients.
    """

    def __init__(self, features: FeatureExtractor, frozen_stages: int, generator: torch.Generator):
        super().__init__()
        self.features = features
        self.frozen_stages = frozen_stages
        self.classifier = nn.Conv2d(features.num_features, NUM_FOREGROUND, 1, bias=False)
        nn.init.kaiming_uniform_(self.classifier.weight, a=math.sqrt(5), generator=generator)  # torch's default
        for stage in features.stages[:frozen_stages]:
            stage.requires_grad_(False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for index, stage in enumerate(self.features.stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.frozen_stages):
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._features(x).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._features(x))

    def train(self, mode: bool = True) -> CAMNet:
        """Train mode everywhere except batch norm, whose statistics stay ImageNet's (IRN)."""
        super().train(mode)
        freeze_batchnorm(self.modules())
        return self


def build_net(cfg: CAMConfig) -> CAMNet:
    """``CAMNet`` with ImageNet backbone weights and a classifier initialised from ``cfg.seed``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return CAMNet(load_feature_extractor(cfg.backbone, cfg.output_stride), cfg.frozen_stages, generator)


@torch.no_grad()
def multiscale_cams(net: CAMNet, rgb: np.ndarray, classes: Sequence[int], scales: Sequence[float],
                    flip: bool, device: str = "cpu") -> np.ndarray:
    """Multi-scale, flipped CAMs of one image for its classes (IRN ``make_cam``; isim Sec. 4.1).

    rgb: ``(H, W, 3) uint8``; classes: the image's class ids (1-20).
    At each scale the image (and its mirror image if ``flip``) is resized, the CAMs of ``classes``
    computed, ReLU'd, un-flipped and added, upsampled to ``(H, W)`` and summed over scales.
    Returns ``(K, H, W) float32 >= 0`` (not normalised), K = ``len(classes)``.
    """
    height, width = rgb.shape[:2]
    total = torch.zeros((len(classes), height, width), dtype=torch.float32)
    if not classes:
        return total.numpy()
    image = to_input(rgb)[None].to(device)
    for scale in scales:
        scaled_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = image if scaled_hw == (height, width) else F.interpolate(
            image, size=scaled_hw, mode="bilinear", align_corners=False, antialias=scale < 1)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cams = F.relu(select_classes(net.class_maps(x), classes))
        cam = cams[0] + cams[1].flip(-1) if flip else cams[0]
        total += cam_to_image_size(cam.float().cpu(), net.features.output_stride, scaled_hw, (height, width))
    return total.numpy()


def label_image(net: CAMNet, rgb: np.ndarray, item: Item, cfg: CAMConfig, device: str) -> LabelResult:
    """One image's ``LabelResult``: label ``(H, W) uint8``, scores ``(K + 1, h, w) float16``."""
    classes = tuple(item.labels)
    cams = normalise_cams(multiscale_cams(net, rgb, classes, cfg.scales, cfg.flip, device))
    label = cams_to_label(cams, classes, cfg.bg_threshold)
    background = np.full((1, *cams.shape[1:]), cfg.bg_threshold, dtype=np.float32)
    scores = downsample_scores(np.concatenate([background, cams]), cfg.score_max_side)
    return LabelResult(item.image_id, label=label, scores=scores, score_classes=(0, *classes))


# --------------------------------------------------------------------------------------------
# Training with checkpoints


def training_params(cfg: CAMConfig) -> dict[str, Any]:
    """The settings that change the trained model (everything but ``_INFERENCE_FIELDS``)."""
    return {k: v for k, v in config_to_params(cfg).items() if k not in _INFERENCE_FIELDS}


def _batch(items: Sequence[Item], cfg: CAMConfig, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Batch ``index`` of ``epoch``: ``(B, 3, c, c) float32`` crops and ``(B, 20) float32`` targets.

    Order and augmentation depend only on (seed, epoch, index), so a resumed run sees the same
    batches. Unreadable images are skipped; None when the whole batch is unreadable.
    """
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(items))
    rng = np.random.default_rng([cfg.seed, epoch, index, 1])
    images, targets = [], []
    for j in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]:
        try:
            rgb = read_image(items[j].image_path)
        except ImageError:
            continue  # ctx.items were validated; a file broken since is left out of training
        images.append(to_input(augment(rgb, rng, cfg.resize_long, cfg.crop_size)))
        targets.append(torch.from_numpy(multilabel_target(items[j].labels)))
    if not images:
        return None
    return torch.stack(images), torch.stack(targets)


def train(cfg: CAMConfig, ctx: RunContext) -> CAMNet:
    """Train (or resume training) the CAM classifier on ``ctx.items``; returns it in eval mode.

    Checkpoints go to ``cam_checkpoint.pt`` in ``ctx.model_dir("cam", training settings)`` every ``cfg.checkpoint_every`` steps and at
    every epoch end (atomic rename); a rerun continues from the last one. Once training is
    complete the model is saved as ``cam_model.pt`` and a rerun only loads it. ``ctx.report("train",
    step, total)`` is called after every step and may raise ``Cancelled``, which propagates.
    """
    if not ctx.items:
        raise ValueError("CAM needs training images: ctx.items is empty")
    net = build_net(cfg).to(ctx.device)
    params = training_params(cfg)
    steps_per_epoch = max(1, len(ctx.items) // cfg.batch_size)  # last partial batch dropped (IRN)
    total = cfg.epochs * steps_per_epoch
    loss_fn = nn.MultiLabelSoftMarginLoss()

    def make_optimizer() -> torch.optim.SGD:
        backbone = [p for p in net.features.parameters() if p.requires_grad]
        head_lr = cfg.lr * cfg.classifier_lr_mult
        return torch.optim.SGD(
            [{"params": backbone, "lr": cfg.lr, "base_lr": cfg.lr},
             {"params": net.classifier.parameters(), "lr": head_lr, "base_lr": head_lr}],
            momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        )

    def step(index: int, optimizer: torch.optim.Optimizer) -> None:
        batch = _batch(ctx.items, cfg, *divmod(index, steps_per_epoch))
        if batch is None:
            return
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(group["base_lr"], index, total, cfg.poly_power)
        loss = loss_fn(net(batch[0].to(ctx.device)), batch[1].to(ctx.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_resumable(net, ctx.model_dir(FAMILY, params), FAMILY, params, make_optimizer=make_optimizer, step=step,
                    total=total, steps_per_epoch=steps_per_epoch, checkpoint_every=cfg.checkpoint_every,
                    report=lambda done: ctx.report("train", done, total))
    return net


@register("cam", kind="method", config=CAMConfig, title="CAM")
def run(cfg: CAMConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train on ``ctx.items`` (or load the trained model), then one result per ``ctx.todo`` image."""
    net = train(cfg, ctx)
    yield from label_each(ctx.todo, lambda rgb, item: label_image(net, rgb, item, cfg, ctx.device))
