"""Pictures of the QA page as pure numpy (presentation only): label maps in VOC colours over the
image, a wipe between two overlays, a class score as a heatmap, and one image's class legend.

Images are ``(H, W, 3) uint8`` RGB; label maps ``(h, w) uint8`` with 0-20 and 255 (ignore); a label
map of another size than the image (a thumbnail rounding) is resized by nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from PIL import Image
from plotly.colors import sample_colorscale, unlabel_rgb

from cache.voc import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, VOC_PALETTE
from engine.ops.metrics import confusion_counts, iou_from_counts

# Plotly's Jet sampled at 256 levels: the usual CAM colouring (blue = low, red = high).
JET = np.array([unlabel_rgb(c) for c in sample_colorscale("Jet", np.linspace(0, 1, 256).tolist())], np.uint8)


def _fit(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if label.shape == shape:
        return label
    return np.asarray(Image.fromarray(label).resize((shape[1], shape[0]), Image.Resampling.NEAREST))


def overlay(image: np.ndarray, label: np.ndarray, opacity: float = 0.6,
            classes: Collection[int] | None = None) -> np.ndarray:
    """``image`` with the label map's classes painted over it in VOC colours, ``(H, W, 3) uint8``.

    opacity in [0, 1]. Background (0) is left unpainted so the image shows through; ignore (255)
    is painted in the VOC cream. classes: paint only these class ids (None: every class).
    """
    label = _fit(label, image.shape[:2])
    painted = label != 0
    if classes is not None:
        painted &= np.isin(label, list(classes))
    out = image.astype(np.float32)
    out[painted] = (1 - opacity) * out[painted] + opacity * VOC_PALETTE[label[painted]]
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


def legend(gt: np.ndarray, labels: dict[str, np.ndarray]) -> list[dict]:
    """One row per class present in the ground truth or any of ``labels`` ({name: label map}),
    ``(H, W) uint8`` each of the ground truth's size: class id and name, its VOC colour as
    ``#rrggbb``, ground-truth pixels (255 excluded), and per label map its pixels and IoU in
    this image (None where neither has the class). Counting follows ``engine.ops.metrics``."""
    counts = {name: confusion_counts(gt, label) for name, label in labels.items()}
    gt_pixels = np.bincount(gt[gt != IGNORE_INDEX].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    present = gt_pixels > 0
    for c in counts.values():
        present |= (c[:, 0] + c[:, 1]) > 0
    rows = []
    for class_id in np.flatnonzero(present):
        r, g, b = VOC_PALETTE[class_id]
        row = {"class_id": int(class_id), "class": VOC_CLASSES[class_id], "colour": f"#{r:02x}{g:02x}{b:02x}",
               "ground truth px": int(gt_pixels[class_id])}
        for name, c in counts.items():
            iou = iou_from_counts(c)[class_id]
            row[f"{name} px"] = int(c[class_id, 0] + c[class_id, 1])
            row[f"{name} IoU"] = None if np.isnan(iou) else float(iou)
        rows.append(row)
    return rows
