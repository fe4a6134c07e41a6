"""ISIM (methods ``isim-cam`` and ``isim-decoder``): an iterative self-improved DeepLabCAM.

Bircanoglu & Arica, "ISIM: Iterative Self-Improved Model for Weakly Supervised Segmentation"
(shared/papers/isim-iterative-self-improved.md) and its code (github.com/cenkbircanoglu/isim):
- Sec. 3.2, Fig. 2-3: an encoder-decoder segmentation network (here smp's ``DeepLabV3Plus``) with a
  classification branch after the encoder (global average pooling + bias-free 1x1 conv: CAMs).
- Algorithm 1: warm up the encoder + branch on image labels, then repeatedly generate
  pseudo-ground-truths from the model's own CAMs and train the whole network on them.
- Sec. 4.1: CAMs -> threshold 0.3 -> label dCRF restricted to the image's classes (the pseudo-
  ground-truths); SGD with momentum 0.9, poly schedule, per-part learning rates.
- Sec. 3.2, Eq. 2-3: the decoder's cross-entropy skips every image whose pseudo-label is all background.

One trained model serves both variants: ``isim-cam`` reads its CAMs (``engine.ops.cams.cam_result``);
``isim-decoder`` its decoder's softmax over background + the image's classes. In: ``ctx.items``
rgb ``(H, W, 3) uint8`` with image labels. Out per image: label ``(H, W) uint8``, scores
``(K + 1, h, w) float16``. Pseudo-labels of a round are stored in chunks, so a killed round resumes.

Deviations, for 2 CPU cores: ImageNet EfficientNet-Lite0 encoder (ResNet-50 in the paper), its CAM
branch on EfficientNet's ImageNet head block (``build_net``), 1 warm-up epoch + one round of 2
epochs at crop 224 (paper: 5 + 45 epochs at 320), pseudo-label dCRF at a long side of 160.
``PAPER_PARAMS`` is one flag away. Measurements: docs/methods/isim.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cache.classes import IGNORE_INDEX
from engine.core.dataset import label_each, read_image
from engine.core.registry import Offer, Role, inference, register, training_key
from engine.core.types import ImageError, Item, LabelResult, RunContext
from engine.ops.augment import augment_with_label
from engine.ops.backbone import BACKBONES, freeze_batchnorm, load_imagenet_encoder, pad_to_multiple, to_input
from engine.ops.cams import cam_result, multilabel_target, multiscale_cams, normalise_cams
from engine.ops.checkpoints import chunked_labels
from engine.ops.crf import IRN_LABEL_DCRF, DCRFConfig, refine_pseudo_label, scaled_dcrf
from engine.ops.pool import open_pool
from engine.ops.scores import argmax_label, downsample_scores, resize_channels
from engine.ops.training import ParamGroup, Training, batch_draw, poly_lr, readable, sgd, train_resumable, trained_model

FAMILY = "isim"  # ctx.model_dir family shared by both variants
PSEUDO_CHUNK = 64  # images per pseudo-label file: a killed regeneration loses at most this many
_PSEUDO_FILE = re.compile(r"^pseudo_r(\d+)_(\d+)\.npz$")
ISIM_DCRF = IRN_LABEL_DCRF  # isim's dCRF is IRN's (``misc/imutils.py: crf_inference_label``)


@dataclass(frozen=True)
class ISIMConfig:
    """Settings of ISIM (both variants). Defaults fit the CPU budget of this workbench.

    Schedule: ``epochs`` passes over ``ctx.items``; the first ``warmup_epochs`` train only the
    classification branch (Algorithm 1, TrainEncoder); pseudo-labels are then regenerated at the
    start of every ``regenerate_every``-th later epoch (rounds 1, 2, ...), each round training the
    whole network on its pseudo-labels. Defaults: 1 warm-up epoch + 1 round of 2 epochs
    (costs: docs/methods/isim.md).

    The paper-scale settings (Sec. 4.1) are ``PAPER_PARAMS``:
    ``registry.get("isim-cam").make_config(PAPER_PARAMS)``; on these cores that is days, not minutes.
    """

    backbone: str = "efficientnet_lite0"  # engine.ops.backbone.BACKBONES key (ImageNet weights)
    output_stride: int = 16  # DeepLab encoder stride; CAMs at 1/16 (isim Sec. 3.2.1 dilates too)
    # Stem + block stages 0-2 (to stride 8) keep their ImageNet weights and get no gradients, as in
    # the CAM baseline (freezing them costs nothing in 2 epochs and saves ~1/3 of a step).
    # BN statistics of the encoder stay ImageNet's (IRN); the new decoder's BN layers train.
    frozen_stages: int = 4
    epochs: int = 3  # isim: 50
    warmup_epochs: int = 1  # classification only (isim: 5)
    # Epochs per pseudo-label round (isim: 10). 2 with 3 epochs = one round: a second round costs a
    # regeneration and its labels were not better (docs/methods/isim.md).
    regenerate_every: int = 2
    batch_size: int = 8  # >= 2: the decoder's batch norm trains
    crop_size: int = 224  # isim: 320 (Sec. 4.1, Table 6); a multiple of output_stride
    resize_long: tuple[int, int] = (224, 448)  # random long side before the crop (isim: 320, 640)
    lr: float = 0.02  # encoder (isim: 0.1 at batch 32 on a GPU; 0.02 was CAM's best here)
    classifier_lr_mult: float = 10.0  # classification branch (isim: 1 = 10x the encoder)
    # Decoder: the isim code uses the encoder's rate (train.py), the paper text a tenth of it.
    # The code's choice: the fresh decoder gets only 2 epochs; 10x hurt the CAMs (docs/methods/isim.md).
    decoder_lr_mult: float = 1.0
    momentum: float = 0.9  # isim Sec. 4.1
    weight_decay: float = 1e-4  # isim conf/train.yaml
    poly_power: float = 0.9  # lr * (1 - step / total) ** power over the whole schedule
    seed: int = 0  # model init, data order and augmentation are derived from it
    checkpoint_every: int = 20  # steps; also at every epoch end (so at every round start)
    pseudo_threshold: float = 0.3  # background score for the pseudo-ground-truths (isim Sec. 4.1)
    pseudo_scales: tuple[float, ...] = (1.0,)  # CAM scales at regeneration (isim: 1, 0.5, 1.5, 2)
    pseudo_flip: bool = False  # add flipped copies at regeneration (isim: yes)
    # dCRF runs on the image resized to this long side (None = full size): its cost grows with the
    # pixel count (0.3-0.8 s at 500x375); its spatial kernel widths shrink by the same factor.
    crf_max_side: int | None = 160
    scales: tuple[float, ...] = inference((1.0, 0.5))  # "isim-cam" CAM scales (isim: 1, 0.5, 1.5, 2)
    flip: bool = inference(True)  # "isim-cam": add horizontally flipped copies at every scale
    decoder_scales: tuple[float, ...] = inference((1.0,))  # "isim-decoder" input scales (probabilities averaged)
    decoder_flip: bool = inference(False)  # "isim-decoder" flipped copies: doubles its cost
    bg_threshold: float = inference(0.3)  # "isim-cam" constant background score (the training threshold)
    class_thresholds: tuple[float, ...] = inference(())  # "isim-cam": one per object class (as CAM's)
    score_max_side: int = inference(128)  # stored scores are downsampled so max(h, w) <= this

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; valid: {sorted(BACKBONES)}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16 (DeepLabV3+), got {self.output_stride}")
        if not 1 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"need 1 <= warmup_epochs < epochs (Algorithm 1 warms up, then self-trains), "
                             f"got warmup_epochs={self.warmup_epochs}, epochs={self.epochs}")
        if self.regenerate_every < 1:
            raise ValueError(f"regenerate_every must be >= 1, got {self.regenerate_every}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the decoder's batch norm trains), got {self.batch_size}")
        if self.crop_size % self.output_stride:
            raise ValueError(f"crop_size must be a multiple of output_stride {self.output_stride}, got {self.crop_size}")
        if any(not 0.0 <= t <= 1.0 for t in (self.bg_threshold, *self.class_thresholds)):
            raise ValueError(f"background thresholds must be in [0, 1], got bg_threshold={self.bg_threshold}, "
                             f"class_thresholds={list(self.class_thresholds)}")
        if self.crf_max_side is not None and self.crf_max_side < 8:
            raise ValueError(f"crf_max_side must be >= 8 or None, got {self.crf_max_side}")
        if not self.scales or not self.decoder_scales or not self.pseudo_scales:
            raise ValueError("scales, decoder_scales and pseudo_scales must not be empty")


PAPER_PARAMS: dict[str, Any] = {
    "frozen_stages": 0,
    "epochs": 50,
    "warmup_epochs": 5,
    "regenerate_every": 10,
    "batch_size": 32,  # isim conf/train.yaml
    "crop_size": 320,
    "resize_long": (320, 640),
    "lr": 0.1,
    "classifier_lr_mult": 10.0,
    "decoder_lr_mult": 0.1,
    "pseudo_scales": (1.0, 0.5, 1.5, 2.0),
    "pseudo_flip": True,
    "crf_max_side": None,
    "scales": (1.0, 0.5, 1.5, 2.0),
    "decoder_scales": (1.0, 0.5, 1.5, 2.0),
    "decoder_flip": True,
}


# --------------------------------------------------------------------------------------------
# Numerics (pure functions)


def foreground_images(target: torch.Tensor) -> torch.Tensor:
    """``r_y`` of isim Eq. 3 per image: does its pseudo-label hold any foreground pixel?

    target: ``(B, H, W)`` integer class ids (0 background, objects 1..N, ``IGNORE_INDEX`` 255).
    Returns ``(B,) bool``. Eq. 3 sums the label values; with the crop padding marked 255 (the isim
    code pads with 0), ignored pixels must not count, so only the object values do.
    """
    if target.ndim != 3:
        raise ValueError(f"expected a target of shape (B, H, W), got {tuple(target.shape)}")
    foreground = (target > 0) & (target != IGNORE_INDEX)
    return foreground.flatten(1).any(dim=1)


def modified_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """isim Eq. 2-3: pixel-wise cross-entropy over the images whose pseudo-label has foreground.

    logits: ``(B, C, H, W) float``; target: ``(B, H, W) int64`` in 0..C-1 or 255 (ignored).
    Returns a scalar: the mean cross-entropy over the non-ignored pixels of the kept images, and
    0 (still differentiable) when no image is kept. A dropped image gets no gradient. In training
    ``target`` holds the crops, so a crop that misses the objects is dropped too, as in the isim
    code (``train.py`` applies the loss to the cropped batch). The isim code (``losses.py``) multiplies a dropped image's logits by 0, which also gives it no
    gradient but still counts its pixels (at ``log C`` each) in the mean, shrinking the other
    images' gradients; here its pixels are left out of the mean, as the paper's text says ("do not
    calculate any loss for that specific image").
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits (B, C, H, W) and target (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    keep = foreground_images(target)
    target = target.masked_fill(~keep[:, None, None], IGNORE_INDEX)
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def training_round(epoch: int, warmup_epochs: int, regenerate_every: int) -> int:
    """0 during the warm-up epochs, else the pseudo-label round (1, 2, ...) ``epoch`` belongs to.

    Round r starts at epoch ``warmup_epochs + (r - 1) * regenerate_every`` (Algorithm 1; isim
    Sec. 4.1: warm-up 5, regeneration every 10 epochs -> rounds start at epochs 5, 15, 25, ...).
    """
    if epoch < warmup_epochs:
        return 0
    return 1 + (epoch - warmup_epochs) // regenerate_every


def restricted_softmax(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Softmax over background + the image's classes: ``(B, C, h, w)`` -> ``(B, K + 1, h, w)``.

    Channel 0 is background, channel k the class ``classes[k - 1]`` (1..C-1); the other classes'
    logits are dropped before the softmax, so the K + 1 channels sum to 1.
    """
    if logits.ndim != 4:
        raise ValueError(f"expected logits of shape (B, C, h, w), got {tuple(logits.shape)}")
    if any(not 1 <= c < logits.shape[1] for c in classes):
        raise ValueError(f"class ids must be 1-{logits.shape[1] - 1}, got {tuple(classes)}")
    return torch.softmax(logits[:, [0, *classes]], dim=1)


# --------------------------------------------------------------------------------------------
# Model


class DeepLabCAM(nn.Module):
    """smp DeepLabV3+ with a CAM branch after the encoder (isim Sec. 3.2.1, Fig. 3).

    ``seg``: ``smp.DeepLabV3Plus`` whose encoder is timm's features_only EfficientNet-Lite; it
    ends at the last block stage, a linear bottleneck (``(B, 320, H / s, W / s)`` for Lite0, no
    activation). ``head``: EfficientNet's last conv block left out of that encoder (1x1 conv to
    1280 channels + BN + ReLU6, ImageNet weights), so the CAMs come from non-negative features as
    after ResNet's ``layer4`` in the paper (see ``build_net``).
    classify: ``(B, 3, H, W)`` -> ``(B, C - 1)`` logits = bias-free 1x1 conv of the globally pooled
        head features (CAM Sec. 2), C = the classes with background (object c is row c - 1).
    class_maps: same input -> ``(B, C - 1, H / s, W / s)`` raw CAMs; ``classify`` is their mean.
    forward: input sides divisible by ``s`` -> ``(B, C - 1)`` logits and ``(B, C, H, W)`` decoder logits.
    ``class_maps`` and ``features.output_stride`` make it usable by ``ops.cams.multiscale_cams``.
    The first ``frozen_stages`` encoder stages (stem, block stages) get no gradients.
    """

    def __init__(self, seg: smp.DeepLabV3Plus, head: nn.Module, frozen_stages: int, generator: torch.Generator):
        super().__init__()
        self.seg = seg
        self.head = head
        self.frozen_stages = frozen_stages
        channels = [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Conv2d(channels, seg.segmentation_head[0].out_channels - 1, 1, bias=False)
        nn.init.kaiming_uniform_(self.classifier.weight, a=math.sqrt(5), generator=generator)  # torch's default
        for stage in self.encoder_stages[:frozen_stages]:
            stage.requires_grad_(False)

    @property
    def features(self) -> nn.Module:
        """The encoder (smp ``TimmUniversalEncoder``; ``.output_stride``, ``.model``)."""
        return self.seg.encoder

    @property
    def encoder_stages(self) -> list[nn.Module]:
        m = self.seg.encoder.model
        return [nn.ModuleList([m.conv_stem, m.bn1]), *m.blocks]

    def _logits(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(deepest).mean(dim=(2, 3), keepdim=True)).flatten(1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.seg.encoder(x)[-1])

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.seg.encoder(x)[-1]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.seg.encoder(x)
        return self._logits(features[-1]), self.seg.segmentation_head(self.seg.decoder(features))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``(B, 21, H, W)``; input sides divisible by the output stride."""
        return self.seg.segmentation_head(self.seg.decoder(self.seg.encoder(x)))

    def train(self, mode: bool = True) -> DeepLabCAM:
        """Train mode except the ImageNet parts' batch norm, whose statistics stay ImageNet's (IRN)."""
        super().train(mode)
        freeze_batchnorm((*self.seg.encoder.modules(), *self.head.modules()))
        return self


def build_net(cfg: ISIMConfig, num_classes: int) -> DeepLabCAM:
    """``DeepLabCAM`` for ``num_classes`` (background included): ImageNet encoder + head, decoder
    and classifier initialised from ``cfg.seed``.

    Deviation: the paper puts GAP + 1x1 conv straight after ResNet's last block, whose output is
    ReLU'd. The matching EfficientNet features come after its head block (1x1 conv + BN + ReLU6),
    which timm's features_only encoder leaves out; a branch on the bare last block stage (signed,
    linear-bottleneck features) gave CAMs that peaked off the objects (train mIoU 10.7 for the
    positive part vs 22.8 for the negative part on 25 images), so the branch keeps the ImageNet
    head, exactly the features of the CAM baseline.
    """
    with torch.random.fork_rng(devices=[]):  # smp/timm init draw from the global RNG
        torch.manual_seed(cfg.seed)
        seg = smp.DeepLabV3Plus(encoder_name=f"tu-{BACKBONES[cfg.backbone].timm_name}", encoder_weights=None,
                                encoder_output_stride=cfg.output_stride, classes=num_classes)
    head = load_imagenet_encoder(seg.encoder.model, cfg.backbone, cfg.output_stride)
    return DeepLabCAM(seg, head, cfg.frozen_stages, torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def decoder_probs(net: DeepLabCAM, rgb: np.ndarray, classes: Sequence[int], scales: Sequence[float],
                  flip: bool, device: str = "cpu") -> np.ndarray:
    """Decoder class probabilities of one image over background + ``classes``.

    rgb: ``(H, W, 3) uint8``. At each scale the image (and its mirror image if ``flip``) is
    resized, padded to the output stride, run through encoder + decoder, cropped back,
    ``restricted_softmax``'d, un-flipped and resized to ``(H, W)``; the maps are averaged.
    Returns ``(K + 1, H, W) float32`` summing to 1 over channels (channel 0 background).
    """
    height, width = rgb.shape[:2]
    total = torch.zeros((len(classes) + 1, height, width), dtype=torch.float32)
    image = to_input(rgb)[None].to(device)
    for scale in scales:
        sh, sw = max(1, round(height * scale)), max(1, round(width * scale))
        x = image if (sh, sw) == (height, width) else F.interpolate(
            image, size=(sh, sw), mode="bilinear", align_corners=False, antialias=scale < 1)
        if flip:
            x = torch.cat([x, x.flip(-1)])  # flip before padding: the padding stays bottom/right
        logits = net.segment(pad_to_multiple(x, net.features.output_stride))[:, :, :sh, :sw]
        probs = restricted_softmax(logits, classes).float()
        p = (probs[0] + probs[1].flip(-1)) / 2 if flip else probs[0]
        total += F.interpolate(p[None].cpu(), size=(height, width), mode="bilinear", align_corners=False)[0]
    return (total / len(scales)).numpy()


def decoder_label_image(net: DeepLabCAM, rgb: np.ndarray, item: Item, cfg: ISIMConfig, device: str) -> LabelResult:
    """One image's "isim-decoder" result: label ``(H, W) uint8``, scores ``(K + 1, h, w) float16``."""
    classes = (0, *item.labels)
    probs = decoder_probs(net, rgb, item.labels, cfg.decoder_scales, cfg.decoder_flip, device)
    return LabelResult(item.image_id, label=argmax_label(probs, classes),
                       scores=downsample_scores(probs, cfg.score_max_side), score_classes=classes)


# --------------------------------------------------------------------------------------------
# Pseudo-ground-truths (one round), stored in the model dir


@dataclass(frozen=True)
class _CRFJob:
    """One image's dCRF work, run in a worker process (picklable)."""

    image_id: str
    rgb: np.ndarray  # (h, w, 3) uint8, at the dCRF size
    cams: np.ndarray  # (K, h, w) float32, normalised
    classes: tuple[int, ...]
    scale: float  # h / original height: the dCRF kernels shrink by it


def _crf_job(job: _CRFJob, threshold: float, cfg: DCRFConfig) -> LabelResult:
    label = refine_pseudo_label(job.rgb, job.cams, job.classes, threshold, scaled_dcrf(cfg, job.scale))
    return LabelResult(job.image_id, label=label)


def _prepare_job(net: DeepLabCAM, item: Item, cfg: ISIMConfig, device: str) -> _CRFJob | LabelResult:
    """CAMs of one image (in this process, on ``device``) resized to the dCRF size."""
    try:
        rgb = read_image(item.image_path)
    except ImageError as exc:
        return LabelResult(item.image_id, error=str(exc))
    classes = tuple(item.labels)
    cams = normalise_cams(multiscale_cams(net, rgb, classes, cfg.pseudo_scales, cfg.pseudo_flip, device))
    height, width = rgb.shape[:2]
    scale = 1.0
    if cfg.crf_max_side is not None and max(height, width) > cfg.crf_max_side:
        scale = cfg.crf_max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BILINEAR))
        cams = resize_channels(cams, *size)
    return _CRFJob(item.image_id, rgb, cams, classes, scale)


def _chunk_path(model_dir: Path, round_: int, index: int) -> Path:
    return model_dir / f"pseudo_r{round_}_{index:04d}.npz"


def _remove_pseudo_labels(model_dir: Path, keep_round: int | None) -> None:
    """Delete stored pseudo-label files of every round but ``keep_round``."""
    for path in model_dir.glob("pseudo_r*.npz"):
        match = _PSEUDO_FILE.match(path.name)
        if match and int(match[1]) != keep_round:
            path.unlink(missing_ok=True)


def regenerate(net: DeepLabCAM, cfg: ISIMConfig, ctx: RunContext, model_dir: Path, round_: int) -> dict[str, np.ndarray]:
    """Pseudo-labels of round ``round_`` for ``ctx.items``: ``{image_id: (h, w) uint8}``.

    Files of ``PSEUDO_CHUNK`` images are written to ``model_dir`` as they complete and reused by
    a rerun (``checkpoints.chunked_labels``), so a killed regeneration resumes at its last
    unfinished file. CAMs are computed in this process; dCRF runs on ``ctx.processes`` worker
    processes. An unreadable image gets no pseudo-label. Reports ``("pseudo-labels round r",
    done, len(items))``.
    """
    net.eval()
    with open_pool(ctx) as pool:
        return chunked_labels(
            ctx.items, PSEUDO_CHUNK, lambda index: _chunk_path(model_dir, round_, index),
            lambda chunk: pool.map(_crf_job, (_prepare_job(net, item, cfg, ctx.device) for item in chunk),
                                   cfg.pseudo_threshold, ISIM_DCRF),
            lambda done, total: ctx.report(f"pseudo-labels round {round_}", done, total))


# --------------------------------------------------------------------------------------------
# Training with checkpoints


def _batch(items: Sequence[Item], cfg: ISIMConfig, num_objects: int, epoch: int, index: int,
           pseudo: dict[str, np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Batch ``index`` of ``epoch``: crops ``(B, 3, c, c) float32``, targets ``(B, C - 1) float32``
    and, in self-training (``pseudo`` given), pseudo-labels ``(B, c, c) int64`` (255 = ignore).

    Order and augmentation depend only on (seed, epoch, index), so a resumed run sees the same
    batches. Unreadable images are skipped, an image without a pseudo-label is all-ignore (its
    classification loss still counts); None when fewer than 2 images are left (the decoder's
    batch norm needs 2).
    """
    indices, rng = batch_draw(len(items), cfg.batch_size, cfg.seed, epoch, index)
    unknown = np.full((1, 1), IGNORE_INDEX, dtype=np.uint8)
    images, targets, segs = [], [], []
    for item, rgb in readable(items, indices):
        label = None if pseudo is None else pseudo.get(item.image_id, unknown)
        image, crop_label = augment_with_label(rgb, label, rng, cfg.resize_long, cfg.crop_size)
        images.append(to_input(image))
        targets.append(torch.from_numpy(multilabel_target(item.labels, num_objects)))
        if crop_label is not None:
            segs.append(torch.from_numpy(crop_label.astype(np.int64)))
    if len(images) < 2:
        return None
    return torch.stack(images), torch.stack(targets), torch.stack(segs) if pseudo is not None else None


def _groups(net: DeepLabCAM, cfg: ISIMConfig) -> list[ParamGroup]:
    """One group per part (isim Sec. 4.1): encoder (+ ImageNet head block), decoder (+ its
    segmentation head), classifier."""
    return [
        ParamGroup([p for p in (*net.seg.encoder.parameters(), *net.head.parameters()) if p.requires_grad], cfg.lr),
        ParamGroup([*net.seg.decoder.parameters(), *net.seg.segmentation_head.parameters()],
                   cfg.lr * cfg.decoder_lr_mult),
        ParamGroup(list(net.classifier.parameters()), cfg.lr * cfg.classifier_lr_mult),
    ]


def train(cfg: ISIMConfig, ctx: RunContext) -> DeepLabCAM:
    """Train (or resume, or load) ISIM on ``ctx.items``; returns the model in eval mode.

    Algorithm 1 as an epoch schedule (``training_round``): warm-up epochs on image labels, then
    rounds that each regenerate the pseudo-labels (``regenerate``) from the current model and
    train on them. The poly schedule runs over all epochs. Checkpoints fall at every epoch end, so
    a round always starts from a saved model and a rerun regenerates (or reloads) exactly its
    pseudo-labels; once done the pseudo-label files are deleted. Model files live in
    ``ctx.model_dir("isim", training key)``. Reports ``("warm-up", step, warm-up steps)``, the
    regeneration stages and ``("self-training", step, self-training steps)``; ``Cancelled``
    propagates. Raises ``ValueError`` without training images.
    """
    if not ctx.items:
        raise ValueError("ISIM needs training images: ctx.items is empty")
    net = build_net(cfg, ctx.classes.num_classes).to(ctx.device)
    key = training_key(cfg, classes=list(ctx.classes.names))
    model_dir = ctx.model_dir(FAMILY, key)
    steps_per_epoch = max(1, len(ctx.items) // cfg.batch_size)  # last partial batch dropped (IRN)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    cls_loss = nn.MultiLabelSoftMarginLoss()
    pseudo: dict[str, Any] = {"round": 0, "labels": None}

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        epoch, within = divmod(step, steps_per_epoch)
        round_ = training_round(epoch, cfg.warmup_epochs, cfg.regenerate_every)
        if round_ != pseudo["round"]:
            pseudo["labels"] = regenerate(net, cfg, ctx, model_dir, round_)
            _remove_pseudo_labels(model_dir, keep_round=round_)
            pseudo["round"] = round_
            net.train()
        return _batch(ctx.items, cfg, len(ctx.classes.foreground), epoch, within, pseudo["labels"])

    def loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        x, target = batch[0].to(ctx.device), batch[1].to(ctx.device)
        if batch[2] is None:
            return cls_loss(net.classify(x), target)
        logits, seg_logits = net(x)
        return cls_loss(logits, target) + modified_cross_entropy(seg_logits, batch[2].to(ctx.device))

    def report(done: int) -> None:
        if done <= warmup:
            ctx.report("warm-up", done, warmup)
        else:
            ctx.report("self-training", done - warmup, total - warmup)

    train_resumable(net, model_dir, Training(
        name=FAMILY, key=key, total=total, steps_per_epoch=steps_per_epoch, checkpoint_every=cfg.checkpoint_every,
        groups=lambda: _groups(net, cfg), optimizer=sgd(cfg.momentum, cfg.weight_decay),
        lr=lambda step, base: poly_lr(base, step, total, cfg.poly_power), batch=batch, loss=loss, report=report,
        device=ctx.device))
    _remove_pseudo_labels(model_dir, keep_round=None)
    return net


# --------------------------------------------------------------------------------------------
# The two variants: one trained model, two read-outs


def _label_all(cfg: ISIMConfig, ctx: RunContext, label_fn) -> Iterator[LabelResult]:
    net = trained_model(train, cfg, ctx)
    yield from label_each(ctx.todo, lambda rgb, item: label_fn(net, rgb, item, cfg, ctx.device))


def _cam_label_image(net: DeepLabCAM, rgb: np.ndarray, item: Item, cfg: ISIMConfig, device: str) -> LabelResult:
    return cam_result(net, rgb, item, cfg.scales, cfg.flip, cfg.bg_threshold, cfg.score_max_side, device,
                      cfg.class_thresholds)


@register("isim-cam", role=Role.METHOD, config=ISIMConfig, title="ISIM CAM", offers={Offer.QUEUE},
          needs_background=True, threshold_sweep=True)
def run_cam(cfg: ISIMConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train ISIM (or load it), then each ``ctx.todo`` image's CAM pseudo-label (``cam_result``:
    scales ``cfg.scales``, background at ``cfg.bg_threshold``) with the normalised CAMs as scores."""
    yield from _label_all(cfg, ctx, _cam_label_image)


@register("isim-decoder", role=Role.METHOD, config=ISIMConfig, title="ISIM decoder", offers={Offer.QUEUE},
          needs_background=True)
def run_decoder(cfg: ISIMConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train ISIM (or load it), then each ``ctx.todo`` image's decoder prediction over background +
    its classes (``decoder_label_image``) with those softmax probabilities as scores."""
    yield from _label_all(cfg, ctx, decoder_label_image)
