"""The final segmentation network (final training ``deeplab``): DeepLabV3+ trained on a label set,
predicting any split.

The last stage of every WSSS pipeline: ISLE (shared/papers/isle-class-wise-ensemble.md),
Algorithm 3 step 4 and Table 2 (each component's pseudo-labels and the ensemble train the same
DeepLabV3+); isim (shared/papers/isim-iterative-self-improved.md), Sec. 4.1 (SGD with momentum
0.9, poly schedule, random flip and crop). It follows a label set in a chain (a method's
pseudo-labels, an ISLE merge, or the ground truth, the upper bound): the network trains on the
source's label maps of the source's own split (``ctx.source_items``) and predicts the images of
the split the job runs on, so on val the variant's counts are the model's per-class IoU there.

Model: segmentation-models-pytorch ``DeepLabV3Plus`` (output stride 16, one output per class of the dataset), encoder an
ImageNet EfficientNet-Lite (default Lite0) or any smp encoder with a local state dict; pretrained
encoder batch norm keeps its statistics. Loss: cross-entropy, 255 ignored. Trains resumably
(``engine.ops.training``), keyed by the settings, the source variant and its images, so predicting
another split reuses the model; curves: the loss every step, the mIoU on the first ``val_images``
images of the job's split at each epoch end (``ctx.log``).
Out per image: label ``(H, W) uint8`` = argmax over every class (no image-level labels at test
time); scores = softmax of background and every class reaching ``keep_prob``, ``(K, h, w) float16``.
Deviation: GroupNorm in the ASPP image-pooling branch (``pool_norm``). Costs: docs/methods/deeplab.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn

from cache.classes import IGNORE_INDEX, ClassSet
from engine.core.dataset import label_each, read_image, read_mask
from engine.core.registry import Offer, Role, inference, register, training_key
from engine.core.types import ImageError, Item, LabelResult, RunContext, SourceVariant
from engine.ops.augment import augment_with_label
from engine.ops.backbone import BACKBONES, freeze_batchnorm, load_imagenet_encoder, pad_to_multiple, to_input
from engine.ops.metrics import confusion_counts, iou_from_counts
from engine.ops.scores import downsample_scores
from engine.ops.training import ParamGroup, Training, batch_draw, poly_lr, readable, sgd, train_resumable, trained_model

FAMILY = "deeplab"
PAPER_PARAMS = {"crop_size": 320, "epochs": 30, "batch_size": 16}  # isim Sec. 4.1 crop; a GPU budget


@dataclass(frozen=True)
class DeepLabConfig:
    """Training and inference settings. The defaults train on the bundled train split in about 16
    minutes on 2 CPU cores (docs/methods/deeplab.md); ``PAPER_PARAMS`` is the larger setting.
    Inference fields re-predict with the same trained model."""

    encoder: str = "efficientnet_lite0"  # engine.ops.backbone.BACKBONES key, or an smp encoder name
    # a local state dict for a non-Lite encoder (None: random init); a user's path (engine.core.roots)
    encoder_weights: str | None = field(default=None, metadata={"path": "read"})
    output_stride: int = 16
    # The ASPP image-pooling branch normalises one value per image and channel: with smp's
    # BatchNorm and batch 8 its running variance collapsed to 5e-16 in one training (val
    # predictions then one class everywhere, val mIoU 0.5); "group" uses GroupNorm(32) there.
    pool_norm: str = "group"
    epochs: int = 2
    batch_size: int = 8
    crop_size: int = 256
    resize_long: tuple[int, int] = (256, 448)  # random long side before the crop (images ~500)
    lr: float = 0.01  # encoder; SGD momentum 0.9, poly schedule (isim Sec. 4.1)
    # 10 (a common choice for new layers) collapsed the decoder here: after 50 steps on the
    # ground truth of 400 train images, loss 1.22 and val mIoU 9.8 on 24 images, against 0.83 and
    # 20.5 with 1 (isim's code also gives the decoder the encoder's rate).
    decoder_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    checkpoint_every: int = 20
    val_images: int = inference(32)  # validation-curve images per epoch (first of the job's split)
    test_flip: bool = inference(False)  # average with the mirrored prediction
    keep_prob: float = inference(0.05)  # a class's scores are stored if its probability reaches this
    score_max_side: int = inference(128)

    def __post_init__(self) -> None:
        if self.encoder not in BACKBONES and not self.encoder.startswith("tu-") \
                and self.encoder not in smp.encoders.get_encoder_names():
            raise ValueError(f"deeplab: unknown encoder {self.encoder!r}; use one of {sorted(BACKBONES)}, an smp "
                             "encoder name (e.g. resnet50) or a timm one as tu-<name>")
        if self.encoder not in BACKBONES and self.encoder_weights is not None and not Path(self.encoder_weights).is_file():
            raise ValueError(f"deeplab: encoder_weights {self.encoder_weights!r} is not a file")
        if self.pool_norm not in ("group", "batch"):
            raise ValueError(f"deeplab: pool_norm must be 'group' or 'batch', got {self.pool_norm!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("deeplab: epochs must be >= 1 and batch_size >= 2 (decoder batch norm)")


class SegNet(nn.Module):
    """smp DeepLabV3+ whose pretrained encoder keeps its batch-norm statistics in training."""

    def __init__(self, seg: smp.DeepLabV3Plus, pretrained: bool):
        super().__init__()
        self.seg = seg
        self.pretrained = pretrained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised, H and W multiples of the output stride -> ``(B, 21, H, W)`` logits."""
        return self.seg(x)

    def train(self, mode: bool = True) -> SegNet:
        super().train(mode)
        if self.pretrained:
            freeze_batchnorm(self.seg.encoder.modules())
        return self


def build_net(cfg: DeepLabConfig, num_classes: int) -> SegNet:
    """The network over ``num_classes`` (background included) with its encoder weights (package
    ImageNet weights, a local file, or none); decoder initialised from ``cfg.seed``. Raises
    ``ValueError`` for an unknown encoder."""
    lite = cfg.encoder in BACKBONES
    name = f"tu-{BACKBONES[cfg.encoder].timm_name}" if lite else cfg.encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            seg = smp.DeepLabV3Plus(encoder_name=name, encoder_weights=None,
                                    encoder_output_stride=cfg.output_stride, classes=num_classes)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"deeplab: unknown encoder {cfg.encoder!r} ({exc})") from None
    if cfg.pool_norm == "group":
        pooling = seg.decoder.aspp[0].convs[-1]  # AdaptiveAvgPool2d, 1x1 conv, BatchNorm2d, ReLU
        pooling[2] = nn.GroupNorm(32, pooling[2].num_features)
    if lite:
        load_imagenet_encoder(seg.encoder.model, cfg.encoder, cfg.output_stride)
    elif cfg.encoder_weights:
        state = torch.load(cfg.encoder_weights, map_location="cpu", weights_only=True)
        seg.encoder.load_state_dict(state, strict=True)
    return SegNet(seg, pretrained=lite or cfg.encoder_weights is not None)


def _batch(items: Sequence[Item], source: SourceVariant, cfg: DeepLabConfig, epoch: int, index: int
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Batch ``index`` of ``epoch``: crops ``(B, 3, c, c)`` and labels ``(B, c, c) int64`` (255 =
    ignore), fixed by (seed, epoch, index) so a resumed run sees the same batches; unreadable
    images are skipped; None when fewer than 2 remain."""
    indices, rng = batch_draw(len(items), cfg.batch_size, cfg.seed, epoch, index)
    images, labels = [], []
    for item, rgb in readable(items, indices):
        try:
            label = source.label(item.image_id)
        except (ValueError, OSError):
            continue  # validated when recorded; a label map broken since is left out of training
        image, crop = augment_with_label(rgb, label, rng, cfg.resize_long, cfg.crop_size)
        images.append(to_input(image))
        labels.append(torch.from_numpy(crop.astype(np.int64)))
    if len(images) < 2:
        return None
    return torch.stack(images), torch.stack(labels)


@torch.no_grad()
def predict_probs(net: SegNet, rgb: np.ndarray, output_stride: int, flip: bool, device: str = "cpu") -> np.ndarray:
    """Softmax class probabilities of one image: ``rgb (H, W, 3) uint8`` -> ``(C, H, W) float32``."""
    height, width = rgb.shape[:2]
    x = pad_to_multiple(to_input(rgb)[None].to(device), output_stride)
    logits = net(x)[..., :height, :width]
    if flip:
        logits = (logits + net(x.flip(-1)).flip(-1)[..., :height, :width]) / 2
    return torch.softmax(logits, dim=1)[0].float().cpu().numpy()


def label_from_probs(probs: np.ndarray, image_id: str, keep_prob: float, max_side: int,
                     classes: ClassSet) -> LabelResult:
    """Argmax label ``(H, W) uint8`` and the stored scores of background (if the class set has
    one) + the classes whose probability reaches ``keep_prob`` somewhere."""
    label = probs.argmax(axis=0).astype(np.uint8)
    peaks = probs.reshape(len(probs), -1).max(axis=1)
    keep = [c for c in range(classes.num_classes) if c == classes.background or peaks[c] >= keep_prob]
    return LabelResult(image_id, label=label, scores=downsample_scores(probs[keep], max_side), score_classes=tuple(keep))


def evaluate(net: SegNet, items: Sequence[Item], cfg: DeepLabConfig, device: str, num_classes: int) -> float:
    """mIoU (in [0, 1]) of the network on ``items`` against their ground truth, over the classes
    present in those images; NaN when none can be read (or none has ground truth)."""
    total = np.zeros((num_classes, 3), np.int64)
    net.eval()
    for item in items:
        if item.mask_path is None:
            continue
        try:
            rgb, gt = read_image(item.image_path), read_mask(item.mask_path, (item.height, item.width))
        except ImageError:
            continue
        label = predict_probs(net, rgb, cfg.output_stride, False, device).argmax(axis=0).astype(np.uint8)
        total += confusion_counts(gt, label, num_classes)
    present = total[:, 0] + total[:, 2] > 0
    return float(np.nanmean(iou_from_counts(total)[present])) if present.any() else float("nan")


def train(cfg: DeepLabConfig, ctx: RunContext) -> SegNet:
    """Train (or resume, or load) on ``ctx.source_items`` with the source's label maps; returns
    the network in eval mode. Reports ``("train", step, total)`` (and ``("validate", ...)`` at
    epoch ends); logs "loss" per step and "val_miou" per epoch. Raises ``ValueError`` without a
    source or training images."""
    if ctx.source is None or not ctx.source_items:
        raise ValueError("deeplab trains on a label set: the run needs a source variant with label maps")
    items = list(ctx.source_items)
    net = build_net(cfg, ctx.classes.num_classes).to(ctx.device)
    key = training_key(cfg, source=ctx.source.variant_id, classes=list(ctx.classes.names))
    model_dir = ctx.model_dir(FAMILY, key, images=items)
    steps_per_epoch = max(1, len(items) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    val_items = [item for item in ctx.items if item.mask_path is not None][: cfg.val_images]
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def after_step(done: int, loss: float | None) -> None:
        if loss is not None:
            ctx.log("loss", done, loss)
        if done % steps_per_epoch == 0 and val_items:
            ctx.report("validate", done, total)
            ctx.log("val_miou", done, evaluate(net, val_items, cfg, ctx.device, ctx.classes.num_classes))

    train_resumable(net, model_dir, Training(
        name=FAMILY, key=key, total=total, steps_per_epoch=steps_per_epoch, checkpoint_every=cfg.checkpoint_every,
        groups=lambda: [ParamGroup(list(net.seg.encoder.parameters()), cfg.lr),
                        ParamGroup([*net.seg.decoder.parameters(), *net.seg.segmentation_head.parameters()],
                                   cfg.lr * cfg.decoder_lr_mult)],
        optimizer=sgd(cfg.momentum, cfg.weight_decay),
        lr=lambda step, base: poly_lr(base, step, total, cfg.poly_power),
        batch=lambda step: _batch(items, ctx.source, cfg, *divmod(step, steps_per_epoch)),
        loss=lambda batch: loss_fn(net(batch[0].to(ctx.device)), batch[1].to(ctx.device)),
        # ASPP's dropout draws from torch's RNG: seeded per step so that a resumed run repeats the
        # uninterrupted one.
        seed=lambda step: cfg.seed * 1_000_003 + step,
        after_step=after_step, report=lambda done: ctx.report("train", done, total), device=ctx.device,
        prefetch=True))
    return net


@register("deeplab", role=Role.FINAL, config=DeepLabConfig, title="DeepLabV3+", offers={Offer.TRAIN})
def run(cfg: DeepLabConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train on the source label set (once), then predict every ``ctx.todo`` image."""
    net = trained_model(train, cfg, ctx)
    yield from label_each(ctx.todo, lambda rgb, item: label_from_probs(
        predict_probs(net, rgb, cfg.output_stride, cfg.test_flip, ctx.device), item.image_id, cfg.keep_prob,
        cfg.score_max_side, ctx.classes))
