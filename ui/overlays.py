"""Pictures of the QA page as pure numpy (presentation only): label maps in the dataset's colours
over the image, a wipe between two overlays, a class score as a heatmap, and one image's class legend.

Images are ``(H, W, 3) uint8`` RGB; label maps ``(h, w) uint8`` label values of the dataset's class
set (``cache.classes.ClassSet``: index into ``classes.names``, 255 = ignore); a label map of another
size than the image (a thumbnail rounding) is resized by nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from PIL import Image
from plotly.colors import sample_colorscale, unlabel_rgb

from cache.classes import IGNORE_INDEX, ClassSet
from engine.ops.metrics import confusion_counts, iou_from_counts

# Plotly's Jet sampled at 256 levels: the usual CAM colouring (blue = low, red = high).
JET = np.array([unlabel_rgb(c) for c in sample_colorscale("Jet", np.linspace(0, 1, 256).tolist())], np.uint8)


def _fit(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if label.shape == shape:
        return label
    return np.asarray(Image.fromarray(label).resize((shape[1], shape[0]), Image.Resampling.NEAREST))


def overlay(image: np.ndarray, label: np.ndarray, classes: ClassSet, opacity: float = 0.6,
            only: Collection[int] | None = None) -> np.ndarray:
    """``image`` with the label map's classes painted over it in ``classes.palette``, ``(H, W, 3) uint8``.

    opacity in [0, 1]. Background (``classes.background``; none in a set without one) is left
    unpainted so the image shows through; ignore (255) is painted in the palette's cream.
    only: paint only these label values (None: every class).
    """
    label = _fit(label, image.shape[:2])
    painted = label != classes.background if classes.has_background else np.ones(label.shape, bool)
    if only is not None:
        painted &= np.isin(label, list(only))
    out = image.astype(np.float32)
    out[painted] = (1 - opacity) * out[painted] + opacity * classes.palette[label[painted]]
    return out.round().astype(np.uint8)


def wipe(left: np.ndarray, right: np.ndarray, position: float) -> np.ndarray:
    """``left`` up to ``position`` (a fraction of the width, in [0, 1]) and ``right`` after it,
    with a 2-pixel white line at the seam: a comparison slider drawn on the server."""
    if left.shape != right.shape:
        raise ValueError(f"cannot wipe between images of shapes {left.shape} and {right.shape}")
    out = right.copy()
    seam = int(round(position * left.shape[1]))
    out[:, :seam] = left[:, :seam]
    out[:, max(seam - 1, 0):seam + 1] = 255
    return out


def score_overlay(image: np.ndarray, score: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """``image`` under a class score map coloured with Jet, ``(H, W, 3) uint8``.

    score: ``(h, w) float`` in [0, 1] (values outside are clipped), upsampled bilinearly to the
    image, as the CAM papers draw it.
    """
    height, width = image.shape[:2]
    score = np.clip(np.asarray(score, np.float32), 0.0, 1.0)
    if score.shape != (height, width):
        score = np.asarray(Image.fromarray(score, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    colours = JET[np.clip(score * 255, 0, 255).astype(np.uint8)].astype(np.float32)
    return ((1 - opacity) * image + opacity * colours).round().astype(np.uint8)


def _pixels(label: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes,) int64`` pixels per class of a label map, 255 excluded."""
    return np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes].astype(np.int64)


def legend(gt: np.ndarray | None, labels: dict[str, np.ndarray], classes: ClassSet) -> list[dict]:
    """One row per class present in the ground truth or any of ``labels`` ({name: label map}),
    ``(H, W) uint8`` each of the ground truth's size: class id and name, its palette colour as
    ``#rrggbb``, ground-truth pixels (255 excluded), and per label map its pixels and IoU in this
    image (None where neither has the class). Counting follows ``engine.ops.metrics``.

    gt: None for an image without ground truth: its pixels and every IoU are then None, and a
    label map's pixels are its own (255 excluded).
    """
    n = classes.num_classes
    if gt is None:
        counts = None
        pixels = {name: _pixels(label, n) for name, label in labels.items()}
        gt_pixels = np.zeros(n, np.int64)
    else:
        counts = {name: confusion_counts(gt, label, n) for name, label in labels.items()}
        pixels = {name: c[:, 0] + c[:, 1] for name, c in counts.items()}
        gt_pixels = _pixels(gt, n)
    present = gt_pixels > 0
    for p in pixels.values():
        present |= p > 0
    rows = []
    for class_id in np.flatnonzero(present):
        r, g, b = classes.palette[class_id]
        row = {"class_id": int(class_id), "class": classes.name(int(class_id)), "colour": f"#{r:02x}{g:02x}{b:02x}",
               "ground truth px": None if gt is None else int(gt_pixels[class_id])}
        for name in labels:
            row[f"{name} px"] = int(pixels[name][class_id])
            iou = np.nan if counts is None else iou_from_counts(counts[name])[class_id]
            row[f"{name} IoU"] = None if np.isnan(iou) else float(iou)
        rows.append(row)
    return rows
