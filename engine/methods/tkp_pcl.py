"""TKP-PCL (method ``tkp-pcl``): top-K pooling over patch classifications with a patch contrastive error.

Wu, Dai, Huang, Ma & Xiao, "Top-K Pooling with Patch Contrastive Learning for Weakly-Supervised
Semantic Segmentation" (shared/papers/tkp-pcl-topk-patch-contrastive.md):
- Sec. 3.2: patch embeddings ``F_in (s, e)`` -> HV-BiLSTM -> ``F_out (s, e)``; eq. 1
  ``Z = softmax(F_out W)`` over the dataset's classes with background; top-K pooling (k = 6) and eq. 2,
  the multi-label classification error.
- Sec. 3.3: eq. 3-5, the patch contrastive error over high- and low-confidence patches (eps =
  0.85); eq. 6 ``L = L_MCE + alpha * sum_c L_PCE^c``, alpha = 0.01. Sec. 4.1: Adam, batch 16.
What the paper leaves open follows ViT-PCM (Rossetti et al., ECCV 2022, ``model.py``): the HV-
BiLSTM (timm ``LSTM2d``, hidden e / 4, union "cat"), dropout 0.2, a bias-free classifier, a
background target always 1. The pseudo-label is the per-patch argmax over background + the
image's classes, bilinearly upsampled (Sec. 3.1; the dCRF after it is the ``dcrf`` refinement).

In: ``ctx.items`` rgb ``(H, W, 3) uint8`` -> frozen encoder features ``(N, V, g, g, e) float16``,
stored once in the model dir (resumable) -> ``PatchClassifier``. Out per image: label ``(H, W)
uint8``, scores ``(K + 1, h, w) float16`` (the restricted softmax, channel 0 = background).

DEVIATION: the paper's patches come from an ImageNet ViT-B/16; no ViT weights are available
offline, so by default they are the cells of the frozen ImageNet EfficientNet-Lite0 feature map
at stride 16 (320 channels, after the last MBConv stage); a local ViT weights file
(``vit_weights``) gives the paper's encoder. 6 epochs at 256 x 256 instead of 50 at 384.
Measurements: docs/methods/tkp_pcl.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import load_state_dict
from timm.models.sequencer import LSTM2d
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from cache.classes import ClassSet
from engine.core.dataset import read_image
from engine.core.registry import Offer, Role, inference, register, training_key
from engine.core.types import ImageError, Item, LabelResult, RunContext
from engine.ops.backbone import INPUT_MEAN, INPUT_STD, load_feature_extractor
from engine.ops.cams import multilabel_target
from engine.ops.scores import argmax_label, downsample_scores
from engine.ops.training import (ParamGroup, Training, adam, batch_draw, torch_threads, train_resumable,
                                trained_model, trained_state)

FAMILY = "tkp-pcl"  # ctx.model_dir family of the trained classifier
NAME = "tkp_pcl"  # its files: tkp_pcl_checkpoint.pt while training, tkp_pcl_model.pt when done
FEATURES_NAME = "patch_features.npy"  # (N, V, g, g, e) float16, filled batch by batch
FEATURES_INDEX = "patch_features.json"  # image ids, rows done, unreadable rows
ENCODE_BATCH = 8  # images per encoder forward pass (16 with their mirrored copies)
LABEL_BATCH = 32  # images per classifier forward pass when labelling
# The HV-BiLSTM is many small sequential matrix products: one torch thread runs them faster than
# two (docs/methods/tkp_pcl.md).
CLASSIFIER_THREADS = 1


@dataclass(frozen=True)
class TKPPCLConfig:
    """Settings of TKP-PCL. Defaults fit the CPU budget of this workbench (docs/methods/tkp_pcl.md).

    The paper-scale settings are ``PAPER_PARAMS`` (``registry.get("tkp-pcl").make_config(
    {**PAPER_PARAMS, "vit_weights": "/path/to/vit_base_patch16_384.safetensors"})``): ViT-B/16
    at 384 x 384 (24 x 24 patches) for 50 epochs; the weights file must come from the user.
    """

    backbone: str = "efficientnet_lite0"  # engine.ops.backbone key; the encoder when vit_weights is ""
    # a local timm ViT state dict; non-empty = the ViT encoder (the paper's); a user's path (engine.core.roots)
    vit_weights: str = field(default="", metadata={"path": "read"})
    vit_name: str = "vit_base_patch16_224"  # timm architecture of vit_weights (paper: ViT-B/16)
    input_size: int = 256  # images resized to a square of this side: 16 x 16 patches (paper: 384, 24 x 24)
    flip: bool = True  # also encode the mirrored image; each training sample draws one view
    epochs: int = 6
    batch_size: int = 16  # paper Sec. 4.1
    lr: float = 1e-3  # Adam, first lr_drop_epoch epochs (paper Sec. 4.1)
    lr_after: float = 1e-4  # Adam, the remaining epochs (paper Sec. 4.1)
    # Paper: 2 epochs of trainaug (10,582 images, ~1,320 steps) at 1e-3; our epochs are 116 steps,
    # so 4 of them (464 steps) at 1e-3 (docs/methods/tkp_pcl.md: the step count at 1e-3 is what mattered).
    lr_drop_epoch: int = 4
    dropout: float = 0.2  # on F_in and on the classifier input (ViT-PCM DROPOUT)
    top_k: int = 6  # k of top-K pooling (paper Sec. 4.1)
    epsilon: float = 0.85  # PCE confidence threshold (paper Sec. 4.1)
    alpha: float = 0.01  # weight of the PCE, eq. 6 (paper Sec. 4.1)
    seed: int = 0  # initialisation, data order, views and dropout derive from it
    checkpoint_every: int = 20  # steps; also at every epoch end
    score_max_side: int = inference(128)  # stored scores are downsampled so max(h, w) <= this

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.5 < self.epsilon < 1.0:  # above 0.5 the high and low sets of eq. 5 are disjoint
            raise ValueError(f"epsilon must be in (0.5, 1), got {self.epsilon}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("input_size", "epochs", "batch_size", "checkpoint_every", "score_max_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


PAPER_PARAMS: dict[str, Any] = {
    "vit_name": "vit_base_patch16_384",
    "input_size": 384,
    "epochs": 50,
    "lr_drop_epoch": 2,
}
_ENCODER_FIELDS = ("backbone", "vit_weights", "vit_name", "input_size", "flip")


# --------------------------------------------------------------------------------------------
# Numerics (pure functions)


def top_k_pooling(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-K pooling (paper Sec. 3.2): ``y_c = 1/k * sum of the k highest Z_i^c over patches i``.

    scores: ``(B, s, C)`` patch scores Z (eq. 1). Returns ``(B, C)``; with fewer than k patches
    all s are averaged. k = 1 is ViT-PCM's global max pooling, k = s average pooling (Table 4).
    """
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape (B, s, C), got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return scores.topk(min(k, scores.shape[1]), dim=1).values.mean(dim=1)


def classification_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Multi-label classification error, eq. 2: ``-1/|C| sum_c t_c log y_c + (1 - t_c) log(1 - y_c)``.

    y: ``(B, C)`` image scores in [0, 1] (top-K pooled); t: ``(B, C)`` 0/1 targets.
    Returns the mean over the batch (a scalar). Logs are clamped at -100 (torch's BCE).
    """
    if y.shape != t.shape or y.ndim != 2:
        raise ValueError(f"expected y and t of the same shape (B, C), got {tuple(y.shape)} and {tuple(t.shape)}")
    return F.binary_cross_entropy(y, t)


def patch_contrastive_error(features: torch.Tensor, scores: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Patch contrastive error ``L_PCE^c`` of every image and class (paper Sec. 3.3, eq. 3-5).

    features: ``(B, s, e)`` refined patch embeddings F_out; scores: ``(B, s, C)`` patch scores Z
    (only compared with the thresholds; no gradient flows through the selection).
    Per image and class c, P_high = patches with ``Z^c > epsilon``, P_low = ``Z^c < 1 - epsilon``;
    with ``S_bar = (1 + cos) / 2`` (eq. 3-4) the error is the mean of ``1 - S_bar`` over ordered
    pairs of distinct high patches (N+ = |P_high| (|P_high| - 1)) plus the mean of ``S_bar`` over
    (high, low) pairs (N- = |P_high| |P_low|); a term without pairs is 0.
    Returns ``(B, C)``; eq. 6 sums it over C.
    """
    if features.ndim != 3 or scores.ndim != 3 or features.shape[:2] != scores.shape[:2]:
        raise ValueError(f"expected features (B, s, e) and scores (B, s, C), got "
                         f"{tuple(features.shape)} and {tuple(scores.shape)}")
    unit = F.normalize(features, dim=-1)
    similarity = (1 + unit @ unit.transpose(1, 2)) / 2  # (B, s, s), eq. 3-4
    high = (scores > epsilon).to(features.dtype)  # (B, s, C)
    low = (scores < 1 - epsilon).to(features.dtype)
    distinct = 1 - torch.eye(features.shape[1], dtype=features.dtype, device=features.device)
    positive = (high * (((1 - similarity) * distinct) @ high)).sum(dim=1)  # (B, C)
    negative = (high * (similarity @ low)).sum(dim=1)
    n_high, n_low = high.sum(dim=1), low.sum(dim=1)
    n_positive, n_negative = n_high * (n_high - 1), n_high * n_low
    return positive / n_positive.clamp(min=1) + negative / n_negative.clamp(min=1)


def image_target(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """``(C,) float32`` target t of eq. 2 for |C| = ``num_classes`` (background included):
    background (index 0) always 1, then the object classes 1..C-1."""
    return np.concatenate([np.ones(1, dtype=np.float32), multilabel_target(labels, num_classes - 1)])


def restrict_to_image_classes(scores: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep background and the image's classes of the patch scores, renormalised per patch.

    scores: ``(C, h, w)`` softmax Z (eq. 1), channel c = class c. classes: the image's class
    ids (>= 1). Returns ``(K + 1, h, w) float32`` summing to 1 per patch, channel 0 =
    background, channel k = ``classes[k - 1]``; the argmax among the kept classes is unchanged.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape (C, h, w), got {scores.shape}")
    if any(not 1 <= c < scores.shape[0] for c in classes):
        raise ValueError(f"class ids must be 1-{scores.shape[0] - 1}, got {tuple(classes)}")
    kept = scores[[0, *classes]]
    return kept / np.maximum(kept.sum(axis=0, keepdims=True), np.float32(1e-12))


def upsample_scores(scores: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` patch scores of the square-resized image -> ``(K, H, W) float32``, bilinear.

    The patch grid covers the whole image (it was resized, not cropped), so the grid is
    stretched onto ``image_hw`` with half-pixel centres (``align_corners=False``).
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape (K, h, w), got {scores.shape}")
    up = F.interpolate(torch.from_numpy(scores)[None], size=tuple(image_hw), mode="bilinear", align_corners=False)
    return up[0].numpy()


# --------------------------------------------------------------------------------------------
# Patch encoders (frozen) and the trained patch classifier


class PatchEncoder(nn.Module):
    """Frozen encoder: ``(B, 3, S, S) float32`` (normalised with ``mean``/``std``) ->
    ``(B, S / patch_size, S / patch_size, embed_dim) float32`` patch embeddings F_in."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    embed_dim: int


class EfficientNetPatches(PatchEncoder):
    """ImageNet EfficientNet-Lite at output stride 16 up to its last MBConv stage (no conv_head)."""

    def __init__(self, name: str):
        super().__init__()
        extractor = load_feature_extractor(name, output_stride=16)
        self.trunk = nn.Sequential(*extractor.stages[:-1])
        self.mean, self.std, self.patch_size = INPUT_MEAN, INPUT_STD, extractor.output_stride
        self.embed_dim = extractor.model.blocks[-1][-1].conv_pwl.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).permute(0, 2, 3, 1)


class ViTPatches(PatchEncoder):
    """A timm ViT's patch tokens after the final norm, prefix (class) tokens dropped (ViT-PCM)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.patch_size = model.patch_embed.patch_size[0]
        self.embed_dim = model.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]
        return tokens.reshape(x.shape[0], x.shape[2] // self.patch_size, x.shape[3] // self.patch_size, -1)


def load_vit(name: str, weights: Path) -> nn.Module:
    """timm ViT ``name`` (``pretrained=False``, no head) with the weights of a local file, eval mode.

    The file may be a state dict (``.pth``/``.bin``, optionally wrapped as ``{"state_dict": ...}``
    or ``{"model": ...}``) or ``.safetensors`` (timm ``load_state_dict``). A classification head in
    the file is dropped, position embeddings are resampled to the model's grid (timm
    ``checkpoint_filter_fn``), then loading is strict. ``dynamic_img_size`` lets any input size
    divisible by the patch size through. Raises ``FileNotFoundError`` / ``ValueError`` naming the
    file.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"vit_weights {weights}: no such file")
    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    try:
        state = load_state_dict(str(weights))
        state = checkpoint_filter_fn({k: v for k, v in state.items() if not k.startswith("head.")}, model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, OSError, ValueError) as exc:
        raise ValueError(f"vit_weights {weights}: not loadable into timm {name!r} ({exc})") from exc
    return model.eval()


def load_encoder(cfg: TKPPCLConfig) -> PatchEncoder:
    """The frozen patch encoder of ``cfg`` (ViT when ``vit_weights`` is set), in eval mode."""
    encoder = ViTPatches(load_vit(cfg.vit_name, Path(cfg.vit_weights))) if cfg.vit_weights \
        else EfficientNetPatches(cfg.backbone)
    if cfg.input_size % encoder.patch_size:
        raise ValueError(f"input_size {cfg.input_size} must be a multiple of the patch size {encoder.patch_size}")
    return encoder.requires_grad_(False).eval()


def encoder_input(rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``rgb (H, W, 3) uint8`` -> ``(3, size, size) float32``: resized to the square (bilinear,
    aspect ratio not kept, paper Sec. 4.1), scaled to [0, 1], normalised ``(x - mean) / std``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    square = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    x = torch.tensor(square).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@torch.no_grad()
def encode(encoder: PatchEncoder, rgbs: Sequence[np.ndarray], size: int, views: int, device: str) -> np.ndarray:
    """Patch embeddings of images and (``views`` = 2) their mirror images.

    Returns ``(N, views, g, g, e) float16``; view 1 is the embedding of the mirrored image.
    """
    x = torch.stack([encoder_input(rgb, size, encoder.mean, encoder.std) for rgb in rgbs]).to(device)
    if views == 2:
        x = torch.cat([x, x.flip(-1)])
    out = encoder(x).float().cpu().numpy().astype(np.float16)
    return out.reshape(views, len(rgbs), *out.shape[1:]).swapaxes(0, 1)


class PatchClassifier(nn.Module):
    """HV-BiLSTM refinement + patch classifier W (paper Sec. 3.2, eq. 1; ViT-PCM ``HVBiLSTM``/``PC``).

    forward: F_in ``(B, g, g, e) float32`` -> (F_out ``(B, g, g, e)``, Z ``(B, g, g, C)``
    softmax over background + the object classes). F_out concatenates a BiLSTM along every column and one
    along every row (hidden e / 4 each direction, timm ``LSTM2d``); dropout on F_in and on the
    classifier input (ViT-PCM); W is a bias-free linear map (eq. 1).
    """

    def __init__(self, embed_dim: int, dropout: float, num_classes: int):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embedding size {embed_dim} must be divisible by 4 (HV-BiLSTM hidden e / 4)")
        self.drop_in = nn.Dropout(dropout)
        self.hv_bilstm = LSTM2d(embed_dim, embed_dim // 4, bidirectional=True, union="cat", with_fc=False)
        self.drop_out = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)

    def forward(self, f_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_out = self.hv_bilstm(self.drop_in(f_in))
        return f_out, self.classifier(self.drop_out(f_out)).softmax(dim=-1)


def build_net(embed_dim: int, cfg: TKPPCLConfig, num_classes: int) -> PatchClassifier:
    """``PatchClassifier`` over ``num_classes`` (background included) with torch's default
    initialisation drawn from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return PatchClassifier(embed_dim, cfg.dropout, num_classes)


def tkp_pcl_loss(net: PatchClassifier, f_in: torch.Tensor, target: torch.Tensor, cfg: TKPPCLConfig) -> torch.Tensor:
    """Eq. 6 on a batch: ``L_MCE(top_k_pooling(Z), t) + alpha * sum_c L_PCE^c(F_out, Z)``, mean over images."""
    f_out, z = net(f_in)
    f_out, z = f_out.flatten(1, 2), z.flatten(1, 2)  # (B, s, e), (B, s, C)
    mce = classification_error(top_k_pooling(z, cfg.top_k), target)
    if cfg.alpha == 0:
        return mce
    pce = patch_contrastive_error(f_out, z.detach(), cfg.epsilon)
    return mce + cfg.alpha * pce.sum(dim=1).mean()


# --------------------------------------------------------------------------------------------
# Feature store, training with checkpoints, labelling


def training_params(cfg: TKPPCLConfig, classes: ClassSet) -> dict[str, Any]:
    """The training key: the inference fields are left out (``registry.training_key``), and so is
    the encoder field not in use (``vit_name`` without ``vit_weights``, ``backbone`` with them),
    so variants differing only there share a model; the class set's names are in it."""
    return training_key(cfg, exclude=("backbone",) if cfg.vit_weights else ("vit_name",), classes=list(classes.names))


def feature_params(cfg: TKPPCLConfig) -> dict[str, Any]:
    """The settings that change the patch embeddings: the features of every training variant
    with the same encoder live in ``ctx.model_dir("tkp-pcl-features", feature_params(cfg))``."""
    key = training_key(cfg, exclude=("backbone",) if cfg.vit_weights else ("vit_name",))
    return {k: v for k, v in key.items() if k in _ENCODER_FIELDS}


@dataclass
class FeatureStore:
    """Patch embeddings of ``ctx.items``: ``features[row, view]`` is ``(g, g, e) float16``."""

    features: np.ndarray  # (N, V, g, g, e) float16, memory-mapped
    rows: dict[str, int]  # image id -> row
    bad: set[int]  # rows whose image could not be read


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_index(feature_dir: Path, ids: list[str], shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The stored index if it belongs to these images and this feature shape, else None."""
    index_path, features_path = feature_dir / FEATURES_INDEX, feature_dir / FEATURES_NAME
    if not (index_path.is_file() and features_path.is_file()):
        return None
    index = json.loads(index_path.read_text())
    return index if index.get("ids") == ids and tuple(index.get("shape", ())) == shape else None


def extract_features(items: Sequence[Item], cfg: TKPPCLConfig, feature_dir: Path, device: str,
                     report: Callable[[str, int, int], None], encoder: PatchEncoder) -> FeatureStore:
    """Encode every item once (and its mirror image if ``cfg.flip``) into ``FEATURES_NAME``.

    Resumable: after each batch the memory map is flushed, then ``FEATURES_INDEX`` (ids, rows
    done, unreadable rows) is replaced atomically, so a rerun continues after the last recorded
    batch. ``report("features", done, total)`` after each batch may raise ``Cancelled``.
    """
    ids = [item.image_id for item in items]
    grid = cfg.input_size // encoder.patch_size
    shape = (len(items), 2 if cfg.flip else 1, grid, grid, encoder.embed_dim)
    features_path = feature_dir / FEATURES_NAME
    index = _read_index(feature_dir, ids, shape)
    if index is None:
        index = {"ids": ids, "shape": list(shape), "done": 0, "bad": []}
        features = np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float16, shape=shape)
        _write_json(index, feature_dir / FEATURES_INDEX)
    else:
        features = np.load(features_path, mmap_mode="r+")
    for start in range(index["done"], len(items), ENCODE_BATCH):
        rgbs, rows = [], []
        for row in range(start, min(start + ENCODE_BATCH, len(items))):
            try:
                rgbs.append(read_image(items[row].image_path))
                rows.append(row)
            except ImageError:
                index["bad"].append(row)  # ctx.items were validated; a file broken since is skipped
        if rgbs:
            features[rows] = encode(encoder, rgbs, cfg.input_size, shape[1], device)
            features.flush()
        index["done"] = min(start + ENCODE_BATCH, len(items))
        _write_json(index, feature_dir / FEATURES_INDEX)
        report("features", index["done"], len(items))
    del features
    return FeatureStore(np.load(features_path, mmap_mode="r"), {i: r for r, i in enumerate(ids)}, set(index["bad"]))


def open_features(feature_dir: Path, items: Sequence[Item]) -> FeatureStore | None:
    """The complete feature store of ``items`` in ``feature_dir``, or None."""
    index_path = feature_dir / FEATURES_INDEX
    if not index_path.is_file() or not (feature_dir / FEATURES_NAME).is_file():
        return None
    index = json.loads(index_path.read_text())
    ids = [item.image_id for item in items]
    if index.get("ids") != ids or index.get("done") != len(ids):
        return None
    return FeatureStore(np.load(feature_dir / FEATURES_NAME, mmap_mode="r"), {i: r for r, i in enumerate(ids)},
                        set(index["bad"]))


def _step_batch(store: FeatureStore, items: Sequence[Item], valid: np.ndarray, cfg: TKPPCLConfig,
                num_classes: int, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of ``epoch``: F_in ``(B, g, g, e) float32`` and targets ``(B, C) float32``.

    Order and views depend only on (seed, epoch, index), so a resumed run sees the same batches.
    """
    indices, rng = batch_draw(len(valid), cfg.batch_size, cfg.seed, epoch, index)
    rows = np.sort(valid[indices])
    views = rng.integers(store.features.shape[1], size=len(rows))
    f_in = torch.from_numpy(store.features[rows, views].astype(np.float32))
    target = torch.from_numpy(np.stack([image_target(items[r].labels, num_classes) for r in rows]))
    return f_in, target


def train(cfg: TKPPCLConfig, ctx: RunContext) -> tuple[PatchClassifier, FeatureStore | None]:
    """Extract the features and train (or resume, or load) on ``ctx.items``; net in eval mode.

    Model files live in ``ctx.model_dir("tkp-pcl", training key)`` (``engine.ops.training``); once
    trained, a rerun only loads the model (with the feature store if complete, else None).
    Reports ``("features", ...)`` then ``("train", step, total)``; ``Cancelled`` propagates.
    Dropout is seeded per step, so a resumed run equals an uninterrupted one. Raises
    ``ValueError`` when no training image can be read.
    """
    if not ctx.items:
        raise ValueError("TKP-PCL needs training images: ctx.items is empty")
    key = training_params(cfg, ctx.classes)
    num_classes = ctx.classes.num_classes
    model_dir = ctx.model_dir(FAMILY, key)
    feature_dir = ctx.model_dir("tkp-pcl-features", feature_params(cfg))
    finished = trained_state(model_dir, NAME, key)
    if finished is not None:
        net = build_net(finished["embed_dim"], cfg, num_classes)
        net.load_state_dict(finished["model"], strict=True)
        return net.to(ctx.device).eval(), open_features(feature_dir, ctx.items)
    store = extract_features(ctx.items, cfg, feature_dir, ctx.device, ctx.report, load_encoder(cfg).to(ctx.device))
    valid = np.array([r for r in range(len(ctx.items)) if r not in store.bad], dtype=np.int64)
    if not len(valid):
        raise ValueError("TKP-PCL needs training images: none of ctx.items could be read")
    embed_dim = store.features.shape[-1]
    net = build_net(embed_dim, cfg, num_classes).to(ctx.device)
    steps_per_epoch = max(1, len(valid) // cfg.batch_size)  # last partial batch dropped, as CAM
    total = cfg.epochs * steps_per_epoch
    train_resumable(net, model_dir, Training(
        name=NAME, key=key, total=total, steps_per_epoch=steps_per_epoch, checkpoint_every=cfg.checkpoint_every,
        groups=lambda: [ParamGroup(list(net.parameters()), cfg.lr)], optimizer=adam(),
        lr=lambda step, base: base if step // steps_per_epoch < cfg.lr_drop_epoch else cfg.lr_after,
        batch=lambda step: _step_batch(store, ctx.items, valid, cfg, num_classes, *divmod(step, steps_per_epoch)),
        loss=lambda batch: tkp_pcl_loss(net, batch[0].to(ctx.device), batch[1].to(ctx.device), cfg),
        seed=lambda step: int(np.random.default_rng([cfg.seed, step, 2]).integers(2**62)),  # dropout
        report=lambda done: ctx.report("train", done, total), extra={"embed_dim": embed_dim},
        threads=CLASSIFIER_THREADS, device=ctx.device))
    return net, store


@torch.no_grad()
def patch_scores(net: PatchClassifier, f_in: np.ndarray, device: str) -> np.ndarray:
    """Z (eq. 1) of a batch: F_in ``(B, g, g, e)`` -> ``(B, C, g, g) float32`` (net in eval mode)."""
    _, z = net(torch.from_numpy(np.asarray(f_in, dtype=np.float32)).to(device))
    return z.permute(0, 3, 1, 2).float().cpu().numpy()


def label_from_scores(z: np.ndarray, item: Item, cfg: TKPPCLConfig) -> LabelResult:
    """One image's ``LabelResult`` from its patch scores ``(C, g, g)``: label ``(H, W) uint8``
    (argmax over background + the image's classes after bilinear upsampling), scores
    ``(K + 1, h, w) float16`` (the restricted, renormalised Z, upsampled)."""
    classes = tuple(item.labels)
    scores = upsample_scores(restrict_to_image_classes(z, classes), (item.height, item.width))
    return LabelResult(item.image_id, label=argmax_label(scores, (0, *classes)),
                       scores=downsample_scores(scores, cfg.score_max_side), score_classes=(0, *classes))


@register("tkp-pcl", role=Role.METHOD, config=TKPPCLConfig, title="TKP-PCL", offers={Offer.QUEUE},
          needs_background=True)
def run(cfg: TKPPCLConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """Train on ``ctx.items`` (or load the trained model), then one result per ``ctx.todo`` image.

    Images in the feature store are labelled from their stored (unmirrored) embeddings; others
    (e.g. another split) are read and encoded here. The classifier runs on ``LABEL_BATCH`` images
    at a time (its LSTMs are slow one image at a time); results still come in ``ctx.todo`` order.
    """
    net, store = trained_model(train, cfg, ctx)
    encoder: PatchEncoder | None = None
    for start in range(0, len(ctx.todo), LABEL_BATCH):
        chunk: list[tuple[Item, np.ndarray | str]] = []
        for item in ctx.todo[start : start + LABEL_BATCH]:
            row = store.rows.get(item.image_id) if store is not None else None
            if row is not None and row not in store.bad:
                chunk.append((item, store.features[row, 0]))
                continue
            try:
                rgb = read_image(item.image_path)
            except ImageError as exc:
                chunk.append((item, str(exc)))
                continue
            if encoder is None:
                encoder = load_encoder(cfg).to(ctx.device)
            item = Item(item.image_id, item.image_path, item.mask_path, item.labels, *rgb.shape[:2])
            chunk.append((item, encode(encoder, [rgb], cfg.input_size, 1, ctx.device)[0, 0]))
        ready = [f for _, f in chunk if not isinstance(f, str)]
        with torch_threads(CLASSIFIER_THREADS):
            z = iter(patch_scores(net, np.stack(ready), ctx.device) if ready else ())
        for item, f in chunk:
            yield LabelResult(item.image_id, error=f) if isinstance(f, str) else label_from_scores(next(z), item, cfg)
