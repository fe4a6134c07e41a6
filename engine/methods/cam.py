"""CAM baseline (method ``cam``): class activation maps of an image-level classifier, thresholded
into pseudo-labels.

- CAM: Zhou et al., CVPR 2016, Sec. 2: global average pooling + a bias-free linear classifier; a
  class's map is the classifier applied at every feature position.
- PSA (Ahn & Kwak, CVPR 2018), Sec. 3.1, 4.1: multi-label soft-margin loss, random rescale / flip /
  crop, multi-scale flipped inference, a constant background score.
- IRN (Ahn et al., CVPR 2019) and its code (``net/resnet50_cam.py``, ``step/make_cam.py``,
  ``step/eval_cam.py``): output stride 16, ReLU, per-class max normalisation, argmax against the
  background threshold; frozen batch-norm statistics.

Train: ``ctx.items`` rgb ``(H, W, 3) uint8`` -> crops ``(B, 3, c, c)`` -> ``CAMNet`` -> ``(B, N)`` (N object classes)
logits; resumable (``engine.ops.training``), keyed by the training settings. Infer:
``engine.ops.cams.cam_result``: label ``(H, W) uint8`` in ``{0, *image classes}``, scores
``(K + 1, h, w) float16`` (channel 0 = the background threshold). The network runs channels-last;
on CPU its labelling forward passes run in ONNX Runtime (``engine.ops.onnx_runtime``, checked
against PyTorch when the model is loaded), on the worker's process pool. Training runs the
dilated convolutions through their sub-grids (``engine.ops.atrous``) and, on CPU, the frozen
stages in ONNX Runtime on the thread that makes the next batch (``frozen_prefix``).

Deviations, for 2 CPU cores: ImageNet EfficientNet-Lite0 instead of ResNet-50, its first four
stages frozen, 2 epochs at crop 256 (IRN: 5 at 512), scales 1 and 0.5 (IRN: 1, 0.5, 1.5, 2),
background threshold 0.3 (isim Sec. 4.1; IRN 0.15). ``PAPER_PARAMS`` is one flag away.
Measurements: docs/methods/cam.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.core.dataset import label_each, label_image_file
from engine.core.registry import Offer, Role, inference, register, training_key
from engine.core.types import Item, LabelResult, RunContext
from engine.ops.augment import augment
from engine.ops.backbone import FeatureExtractor, freeze_batchnorm, load_feature_extractor, to_input
from engine.ops.cams import cam_result, multilabel_target
from engine.ops.checkpoints import final_path, load_checked
from engine.ops.onnx_runtime import ClassMaps, checked_onnx, class_maps_runner
from engine.ops.pool import run_jobs
from engine.ops.training import ParamGroup, Training, batch_draw, poly_lr, readable, sgd, train_resumable, trained_model

FAMILY = "cam"  # ctx.model_dir family; the files are cam_checkpoint.pt (during training), cam_model.pt (done)


@dataclass(frozen=True)
class CAMConfig:
    """Settings of the CAM baseline; the defaults fit 2 CPU cores (docs/methods/cam.md).

    ``PAPER_PARAMS`` (IRN/isim: 5 epochs, 512 crops from a long side of 320-640, scales 1, 0.5,
    1.5, 2) is ``registry.get("cam").make_config(PAPER_PARAMS)``: hours on these cores.
    """

    backbone: str = "efficientnet_lite0"  # engine.ops.backbone.BACKBONES key (ImageNet weights)
    output_stride: int = 16  # IRN: last stage dilated, CAMs at 1/16 (isim Sec. 3.2.1)
    # Stem + block stages 0-2 (down to stride 8) keep their ImageNet weights and run without
    # gradients: on 2 CPU cores their high-resolution backward pass costs ~1/3 of a step and the
    # edge filters barely change in 2 epochs (IRN freezes ResNet-50's conv1 likewise).
    # 1 = only the stem (as IRN), 0 = train everything. BN statistics are always frozen (IRN).
    frozen_stages: int = 4
    epochs: int = 2
    batch_size: int = 16  # IRN/PSA: 16
    crop_size: int = 256  # IRN: 512, isim: 320
    resize_long: tuple[int, int] = (256, 512)  # random long side before the crop (IRN: 320, 640)
    lr: float = 0.02  # backbone
    classifier_lr_mult: float = 10.0  # the new classifier learns 10x faster (PSA/IRN)
    momentum: float = 0.9  # isim Sec. 4.1 (IRN's PolyOptimizer runs plain SGD at lr 0.1)
    weight_decay: float = 1e-4  # IRN
    poly_power: float = 0.9  # lr * (1 - step / total) ** power (DeepLab "poly", PSA/IRN)
    seed: int = 0  # classifier init, data order and augmentation are derived from it
    checkpoint_every: int = 20  # steps; also at every epoch end
    scales: tuple[float, ...] = inference((1.0, 0.5))  # IRN/isim: (1.0, 0.5, 1.5, 2.0)
    flip: bool = inference(True)  # add horizontally flipped copies at every scale
    bg_threshold: float = inference(0.3)  # constant background score (isim: 0.3, IRN: 0.15)
    # One background threshold per object class (entry c - 1 for class c) instead of bg_threshold,
    # e.g. the per-class best of a threshold sweep; () = bg_threshold for every class.
    class_thresholds: tuple[float, ...] = inference(())
    score_max_side: int = inference(128)  # stored scores are downsampled so max(h, w) <= this

    def __post_init__(self) -> None:
        if any(not 0.0 <= t <= 1.0 for t in (self.bg_threshold, *self.class_thresholds)):
            raise ValueError(f"cam: background thresholds must be in [0, 1], got bg_threshold={self.bg_threshold}, "
                             f"class_thresholds={list(self.class_thresholds)}")


PAPER_PARAMS: dict[str, Any] = {
    "frozen_stages": 1,
    "epochs": 5,
    "crop_size": 512,
    "resize_long": (320, 640),
    "scales": (1.0, 0.5, 1.5, 2.0),
}


class CAMNet(nn.Module):
    """Backbone + global average pooling + bias-free 1x1 conv classifier (CAM Sec. 2; IRN).

    forward: ``(B, 3, H, W) float32`` (``to_input`` normalisation) -> ``(B, N) float32`` logits,
    N = ``num_objects`` (the object classes; label value c is row c - 1).
    class_maps: same input -> ``(B, N, H / s, W / s) float32`` raw CAMs (classifier applied at
    every position, before ReLU); ``forward`` equals their spatial mean.
    The first ``frozen_stages`` backbone stages run without gradients; ``forward(x, first_stage=k)``
    takes instead of an image the output of the stages before ``k`` (CAM training on CPU computes
    the frozen stages' output in ONNX Runtime beforehand).
    """

    def __init__(self, features: FeatureExtractor, frozen_stages: int, generator: torch.Generator,
                 num_objects: int):
        super().__init__()
        self.features = features
        self.frozen_stages = frozen_stages
        self.classifier = nn.Conv2d(features.num_features, num_objects, 1, bias=False)
        nn.init.kaiming_uniform_(self.classifier.weight, a=math.sqrt(5), generator=generator)  # torch's default
        for stage in features.stages[:frozen_stages]:
            stage.requires_grad_(False)

    def _features(self, x: torch.Tensor, first_stage: int = 0) -> torch.Tensor:
        for index, stage in enumerate(self.features.stages[first_stage:], first_stage):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.frozen_stages):
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor, first_stage: int = 0) -> torch.Tensor:
        pooled = self._features(x, first_stage).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._features(x))

    def train(self, mode: bool = True) -> CAMNet:
        """Train mode everywhere except batch norm, whose statistics stay ImageNet's (IRN)."""
        super().train(mode)
        freeze_batchnorm(self.modules())
        return self


def build_net(cfg: CAMConfig, num_objects: int) -> CAMNet:
    """``CAMNet`` with ImageNet backbone weights and a ``num_objects``-class classifier initialised
    from ``cfg.seed``, its weights stored channels-last.

    Channels-last (NHWC) lets oneDNN run EfficientNet's depthwise and 1x1 convolutions without
    layout reorders (the gain depends on the CPU: ``bench.cam_speed``, docs/methods/cam.md); the
    values are those of the NCHW network up to float rounding.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    net = CAMNet(load_feature_extractor(cfg.backbone, cfg.output_stride), cfg.frozen_stages, generator, num_objects)
    return net.to(memory_format=torch.channels_last)


def _batch(items: Sequence[Item], cfg: CAMConfig, num_objects: int, epoch: int, index: int,
           prefix: ClassMaps | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Batch ``index`` of ``epoch``: ``(B, 3, c, c) float32`` crops (channels-last, as the net), or
    with ``prefix`` (the frozen stages) their output, and ``(B, N) float32`` targets.

    Order and augmentation depend only on (seed, epoch, index), so a resumed run sees the same
    batches. Unreadable images are skipped; None when the whole batch is unreadable.
    """
    indices, rng = batch_draw(len(items), cfg.batch_size, cfg.seed, epoch, index)
    images, targets = [], []
    for item, rgb in readable(items, indices):
        images.append(to_input(augment(rgb, rng, cfg.resize_long, cfg.crop_size)))
        targets.append(torch.from_numpy(multilabel_target(item.labels, num_objects)))
    if not images:
        return None
    x = torch.stack(images)
    if prefix is not None:
        x = prefix(x)
    return x.contiguous(memory_format=torch.channels_last), torch.stack(targets)


def frozen_prefix(net: CAMNet, device: str) -> ClassMaps | None:
    """The frozen stages of ``net`` as an ONNX Runtime session checked against PyTorch
    (``checked_onnx``), on CPU with at least one frozen stage; else None (PyTorch runs them in the
    forward pass as before).

    Their output depends only on the batch (frozen weights and batch-norm statistics, no dropout),
    so the training's batch thread computes it while the previous step trains, and without
    autograd's bookkeeping.
    """
    if device != "cpu" or net.frozen_stages == 0:
        return None
    return checked_onnx(nn.Sequential(*net.features.stages[:net.frozen_stages]))


def train(cfg: CAMConfig, ctx: RunContext) -> CAMNet:
    """Train (or resume, or load) the CAM classifier on ``ctx.items``; returns it in eval mode.

    Model files live in ``ctx.model_dir("cam", training key)``. Reports ``("train", step, total)``
    after every step; ``Cancelled`` propagates. Raises ``ValueError`` without training images.
    """
    if not ctx.items:
        raise ValueError("CAM needs training images: ctx.items is empty")
    num_objects = len(ctx.classes.foreground)
    net = build_net(cfg, num_objects).to(ctx.device)
    key = training_key(cfg, classes=list(ctx.classes.names))
    steps_per_epoch = max(1, len(ctx.items) // cfg.batch_size)  # last partial batch dropped (IRN)
    total = cfg.epochs * steps_per_epoch
    loss_fn = nn.MultiLabelSoftMarginLoss()
    # Made on the first batch: a finished training is only loaded and needs no export.
    prefix = functools.cache(lambda: frozen_prefix(net, ctx.device))
    train_resumable(net, ctx.model_dir(FAMILY, key), Training(
        name=FAMILY, key=key, total=total, steps_per_epoch=steps_per_epoch, checkpoint_every=cfg.checkpoint_every,
        groups=lambda: [ParamGroup([p for p in net.features.parameters() if p.requires_grad], cfg.lr),
                        ParamGroup(list(net.classifier.parameters()), cfg.lr * cfg.classifier_lr_mult)],
        optimizer=sgd(cfg.momentum, cfg.weight_decay),
        lr=lambda step, base: poly_lr(base, step, total, cfg.poly_power),
        batch=lambda step: _batch(ctx.items, cfg, num_objects, *divmod(step, steps_per_epoch), prefix()),
        loss=lambda batch: loss_fn(net(batch[0].to(ctx.device), net.frozen_stages if prefix() else 0),
                                   batch[1].to(ctx.device)),
        report=lambda done: ctx.report("train", done, total), device=ctx.device, prefetch=True))
    return net


@dataclass(frozen=True)
class _TrainedModel:
    """Where a Ray task finds the trained network: its final model file and how it was built."""

    path: Path
    cfg: CAMConfig
    num_objects: int
    class_names: tuple[str, ...]  # the training key holds them


@functools.lru_cache(maxsize=1)
def _loaded(model: _TrainedModel, mtime_ns: int) -> tuple[CAMNet, ClassMaps]:
    """The network of a final model file and its ``class_maps_runner``, loaded once per process
    (and again when the file changes)."""
    net = build_net(model.cfg, model.num_objects)
    key = training_key(model.cfg, classes=list(model.class_names))
    net.load_state_dict(load_checked(model.path, key)["model"], strict=True)
    net.eval()
    return net, class_maps_runner(net, "cpu")


def _label_task(item: Item, model: _TrainedModel) -> LabelResult:
    """One image's CAM result in a pool process or Ray task: the trained network is loaded there
    once per process."""
    net, class_maps = _loaded(model, model.path.stat().st_mtime_ns)
    cfg = model.cfg
    return label_image_file(item.image_id, item.image_path, lambda rgb: cam_result(
        net, rgb, item, cfg.scales, cfg.flip, cfg.bg_threshold, cfg.score_max_side, "cpu", cfg.class_thresholds,
        class_maps))


@register("cam", role=Role.METHOD, config=CAMConfig, title="CAM", offers={Offer.QUEUE}, needs_background=True,
          threshold_sweep=True)
def run(cfg: CAMConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train on ``ctx.items`` (or load the trained model), then one result per ``ctx.todo`` image;
    on CPU the CAMs come from ONNX Runtime when it matches PyTorch (``class_maps_runner``).

    On CPU with ``ctx.processes > 1`` or ``ctx.ray_address`` the images are labelled by
    ``run_jobs``: on the local pool (each process on its share of the cores, which keeps them
    busier than one process on all of them) or as Ray tasks. Each pool process or Ray worker
    loads the trained model once from the cache's model store (a path every node sees) and
    records its images' files and rows itself."""
    net = trained_model(train, cfg, ctx)
    if ctx.device == "cpu" and ctx.todo and (ctx.ray_address is not None or ctx.processes > 1):
        names = tuple(ctx.classes.names)
        model_dir = ctx.model_dir(FAMILY, training_key(cfg, classes=list(names)))
        model = _TrainedModel(final_path(model_dir, FAMILY), cfg, len(ctx.classes.foreground), names)
        yield from run_jobs(_label_task, ctx.todo, ctx, model)
        return
    class_maps = class_maps_runner(net, ctx.device) if ctx.todo else net.class_maps
    yield from label_each(ctx.todo, lambda rgb, item: cam_result(
        net, rgb, item, cfg.scales, cfg.flip, cfg.bg_threshold, cfg.score_max_side, ctx.device,
        cfg.class_thresholds, class_maps))
