"""Class activation maps of any image-level classifier with a ``class_maps`` head (CAM, ISIM).

CAM: Zhou et al., CVPR 2016, Sec. 2 (a class's map is the classifier weights applied at every
feature position). Multi-scale flipped inference, ReLU, per-class max normalisation and the
argmax against a constant background score follow IRN (Ahn et al., CVPR 2019; ``step/make_cam.py``,
``step/eval_cam.py``) and isim Sec. 4.1 (scales 1, 0.5, 1.5, 2 with flips; threshold 0.3).

A network used here has ``class_maps(x: (B, 3, H, W)) -> (B, N, H / s, W / s)`` and
``features.output_stride`` = s, N the object classes of a class set whose label 0 is background:
class id c (1..N) is classifier row c - 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.types import Item, LabelResult
from engine.ops.backbone import to_input
from engine.ops.onnx_runtime import ClassMaps
from engine.ops.scores import argmax_label, downsample_scores, strided_to_image
from engine.ops.sweep import label_at, peak


def _check_classes(classes: Sequence[int], num_objects: int) -> None:
    if any(not 1 <= c <= num_objects for c in classes):
        raise ValueError(f"class ids must be 1-{num_objects}, got {tuple(classes)}")


def multilabel_target(labels: Sequence[int], num_objects: int) -> np.ndarray:
    """Image-level labels (class ids 1..N) -> ``(N,) float32`` multi-hot target (PSA/IRN),
    N = ``num_objects``."""
    _check_classes(labels, num_objects)
    target = np.zeros(num_objects, dtype=np.float32)
    target[[c - 1 for c in labels]] = 1.0
    return target


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


def with_background(cams: np.ndarray, threshold: float) -> np.ndarray:
    """``(K, H, W)`` class scores -> ``(K + 1, H, W) float32`` with a constant background channel
    ``threshold`` first (IRN ``eval_cam``: ``np.pad(cams, ((1, 0), ...), constant_values=thres)``)."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"expected cams of shape (K, H, W), got {cams.shape}")
    return np.concatenate([np.full((1, *cams.shape[1:]), threshold, dtype=np.float32), cams])


def cams_to_label(cams: np.ndarray, classes: Sequence[int], threshold: float) -> np.ndarray:
    """Pseudo-label by argmax over ``[threshold, cams]`` (IRN ``eval_cam``; isim Sec. 4.1 step ii).

    cams: ``(K, H, W) float32`` in [0, 1], channel k for object class id ``classes[k]`` (>= 1).
    threshold: the constant background score; a pixel is background unless some class
        exceeds it (ties go to background).
    Returns ``(H, W) uint8`` with values in ``{0, *classes}``.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(
            f"expected cams of shape ({len(classes)}, H, W) for classes {tuple(classes)}, got {cams.shape}")
    if any(c < 1 for c in classes):
        raise ValueError(f"class ids must be object classes (>= 1), got {tuple(classes)}")
    return argmax_label(with_background(cams, threshold), (0, *classes))


def select_classes(class_maps: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Keep only the image's classes: ``(B, N, h, w)`` -> ``(B, K, h, w)``, channel k = ``classes[k]``."""
    if class_maps.ndim != 4:
        raise ValueError(f"expected class maps of shape (B, N, h, w), got {tuple(class_maps.shape)}")
    _check_classes(classes, class_maps.shape[1])
    return class_maps[:, [c - 1 for c in classes]]


@torch.inference_mode()
def multiscale_cams(net: torch.nn.Module, rgb: np.ndarray, classes: Sequence[int], scales: Sequence[float],
                    flip: bool, device: str = "cpu", class_maps: ClassMaps | None = None) -> np.ndarray:
    """Multi-scale, flipped CAMs of one image for its classes (IRN ``make_cam``; isim Sec. 4.1).

    rgb: ``(H, W, 3) uint8``; classes: the image's object class ids (1..N).
    At each scale the image (and its mirror image if ``flip``) is resized, the CAMs of ``classes``
    computed, ReLU'd, un-flipped and added, upsampled to ``(H, W)`` and summed over scales. The
    image and its mirror go through ``net`` as one batch of 2, channels-last for PyTorch (oneDNN's
    fast layout on CPU; the CAMs equal the NCHW ones up to float rounding). ``class_maps`` runs
    the network instead of ``net.class_maps`` (``engine.ops.onnx_runtime.class_maps_runner``).
    Returns ``(K, H, W) float32 >= 0`` (not normalised), K = ``len(classes)``.
    """
    height, width = rgb.shape[:2]
    total = torch.zeros((len(classes), height, width), dtype=torch.float32)
    if not classes:
        return total.numpy()
    image = to_input(rgb)[None].to(device)
    if class_maps is None:  # PyTorch: a channels-last batch (ONNX Runtime takes NCHW as it is)
        def class_maps(x: torch.Tensor) -> torch.Tensor:
            return net.class_maps(x.contiguous(memory_format=torch.channels_last))
    for scale in scales:
        scaled_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = image if scaled_hw == (height, width) else F.interpolate(
            image, size=scaled_hw, mode="bilinear", align_corners=False, antialias=scale < 1)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cams = F.relu(select_classes(class_maps(x), classes))
        cam = cams[0] + cams[1].flip(-1) if flip else cams[0]
        total += strided_to_image(cam.float().cpu(), net.features.output_stride, scaled_hw, (height, width))
    return total.numpy()


def class_threshold_vector(bg_threshold: float, class_thresholds: Sequence[float]) -> np.ndarray:
    """``(256,) float32`` background threshold by class id: ``bg_threshold`` everywhere, or
    ``class_thresholds[c - 1]`` for object class c when given (one per object class of the class
    set). Raises ``ValueError`` for a threshold outside [0, 1]."""
    values = (bg_threshold, *class_thresholds)
    if any(not 0.0 <= float(t) <= 1.0 for t in values):
        raise ValueError(f"background thresholds must be in [0, 1], got {list(values)}")
    vector = np.full(256, bg_threshold, dtype=np.float32)
    vector[1:len(class_thresholds) + 1] = class_thresholds
    return vector


def cam_result(net: torch.nn.Module, rgb: np.ndarray, item: Item, scales: Sequence[float], flip: bool,
               bg_threshold: float, score_max_side: int, device: str = "cpu",
               class_thresholds: Sequence[float] = (), class_maps: ClassMaps | None = None) -> LabelResult:
    """One image's CAM pseudo-label ``(H, W) uint8`` and its scores ``(K + 1, h, w) float16``
    (channel 0 the constant background ``bg_threshold``, long side ``score_max_side``), for the
    image-level classes of ``item``, with the full-resolution ``peak`` the worker sweeps.

    The label is ``cams_to_label`` at ``bg_threshold``, or with ``class_thresholds`` (one per
    object class, ``class_threshold_vector``) a pixel keeps its best class c only when the
    score exceeds c's threshold. ``class_maps``: as for ``multiscale_cams``. Raises
    ``ValueError`` when ``class_thresholds`` is shorter than an image class needs."""
    classes = tuple(item.labels)
    cams = normalise_cams(multiscale_cams(net, rgb, classes, scales, flip, device, class_maps))
    score, best = peak(cams, classes)
    if class_thresholds:
        if classes and max(classes) > len(class_thresholds):
            raise ValueError(f"class_thresholds has {len(class_thresholds)} entries, class {max(classes)} needs one")
        label = label_at(score, best, class_threshold_vector(bg_threshold, class_thresholds))
    else:
        label = cams_to_label(cams, classes, bg_threshold)
    scores = downsample_scores(with_background(cams, bg_threshold), score_max_side)
    return LabelResult(item.image_id, label=label, scores=scores, score_classes=(0, *classes), peak=(score, best))
