"""The pictures of the Pseudo-label QA page: a grid thumbnail with its overlay, and the arrays of
the single-image view (the image, its ground truth, two layers, the class legend, class scores).

Layers are the ground truth (``GT``), nothing (``NONE``) or a variant id. Images are ``(H, W, 3)
uint8`` RGB, label maps ``(H, W) uint8`` label values of the dataset's ``ClassSet`` (255 = ignore),
scores ``(K, h, w) float32``; colours and names come from that class set. An image without ground
truth (a dataset registered from image-level labels) has no ``GT`` layer.
Bad files raise ``ImageError`` / ``LabelMapError`` / ``ThumbnailError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.io.formats.style import Styler

from cache.classes import ClassSet
from cache.labelmaps import read_label_map, read_scores
from cache.thumbnails import image_thumbnail, label_thumbnail
from engine.core.dataset import read_image, read_mask
from ui.overlays import legend, overlay, score_overlay, wipe

GT = "gt"  # the ground truth, as a layer next to the variant ids
NONE = "none"


def grid_thumbnail(cache_dir: Path, image_path: str, mask_path: str | None, label_path: Path | None, layer: str,
                   opacity: float, classes: ClassSet) -> np.ndarray:
    """The thumbnail of one grid cell, ``(h, w, 3) uint8``: the image with ``layer`` overlaid (the
    ground truth's mask, or the variant's label map at ``label_path``); the bare image for "none"
    or a missing layer."""
    image = image_thumbnail(cache_dir, Path(image_path))
    source = Path(mask_path) if layer == GT and mask_path else label_path if layer not in (GT, NONE) else None
    return image if source is None else overlay(image, label_thumbnail(cache_dir, source), classes, opacity)


@dataclass(frozen=True)
class ImageView:
    """One image decoded for the single-image view: ``label_a`` / ``label_b`` are layers A and B
    (None for "none"); ``gt`` None for an image without ground truth."""

    image: np.ndarray
    gt: np.ndarray | None
    label_a: np.ndarray | None
    label_b: np.ndarray | None


def open_image(cache_dir: Path, image_path: str, mask_path: str | None, maps: Mapping[str, tuple[str, str | None]],
               a: str, b: str) -> ImageView:
    """Decode the image, its mask (None: no ground truth) and layers ``a`` and ``b``; ``maps`` is
    ``{variant id: (label path, scores path)}`` relative to the cache. The mask is decoded once,
    also when a layer is it."""
    image = read_image(Path(image_path))
    gt = None if mask_path is None else read_mask(Path(mask_path), image.shape[:2])

    def layer(name: str) -> np.ndarray | None:
        if name == NONE:
            return None
        return gt if name == GT else read_label_map(cache_dir / maps[name][0])

    return ImageView(image, gt, layer(a), layer(b))


def pictures(view: ImageView, opacity: float, classes: ClassSet) -> list[np.ndarray]:
    """Layer A's overlay, then layer B's when there is one, in ``classes.palette``."""
    return [overlay(view.image, label, classes, opacity) for label in (view.label_a, view.label_b)
            if label is not None]


def comparison(view: ImageView, opacity: float, position: float, classes: ClassSet) -> np.ndarray:
    """Layer A left of ``position`` (a fraction of the width), layer B right of it."""
    left, right = pictures(view, opacity, classes)
    return wipe(left, right, position)


def legend_table(view: ImageView, names: Mapping[str, str], a: str, b: str, classes: ClassSet) -> Styler:
    """The class legend of the open image as a styled table: the colour cell painted in the class's
    palette colour, pixels per class of the ground truth and of each variant layer, IoU in % in this
    image (ground-truth pixels labelled 255 ignored; no IoU for an image without ground truth)."""
    compared = {names[layer]: label for layer, label in ((a, view.label_a), (b, view.label_b))
                if label is not None and layer != GT}
    rows = legend(view.gt, compared, classes)
    truth = view.gt is not None
    frame = pd.DataFrame(
        [{"colour": r["colour"], "class": r["class"],
          **{k: v for k, v in r.items() if k.endswith("px") and (truth or k != "ground truth px")},
          **({k: None if v is None else round(100 * v, 1) for k, v in r.items() if k.endswith("IoU")} if truth else {})}
         for r in rows], columns=None if rows else ["colour", "class"])
    return frame.style.map(lambda c: f"background-color: {c}; color: {c}", subset=["colour"]).format(precision=1)


def class_scores(cache_dir: Path, scores_path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """A variant's stored scores of the open image: ``(classes, (K, h, w) float32)``."""
    return read_scores(cache_dir / scores_path)


def score_picture(view: ImageView, score: np.ndarray, opacity: float) -> np.ndarray:
    """One class's score map over the image, Jet-coloured (``overlays.score_overlay``)."""
    return score_overlay(view.image, score, opacity)
