"""Inputs the benchmarks (and tests) derive from the bundled real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def grown_mask(mask: np.ndarray, size: int = 15) -> np.ndarray:
    """A ground-truth mask ``(H, W) uint8`` with every object class grown by a ``size`` max filter
    (pixels) into the background (255 read as background): an over-reaching pseudo-label, which
    dCRF and the ISLE merge have real work on. Returns ``(H, W) uint8``."""
    label = np.where(mask == 255, 0, mask).astype(np.uint8)
    out = label.copy()
    for c in np.unique(label[label > 0]):
        near = np.asarray(Image.fromarray((label == c).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))) > 0
        out[near & (out == 0)] = c
    return out


def voc_subset(root: Path, count: int, dest: Path) -> tuple[Path, list[str]]:
    """``(folder, ids)``: a VOCdevkit folder at ``dest`` of symlinks to the first ``count`` train
    images of ``root`` and their SegmentationClassAug masks (``count`` 0: all of them), with its
    ``train.txt``. Nothing is copied."""
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    ids = ids[:count] if count else ids
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (dest / sub).mkdir(parents=True)
    for image_id in ids:
        (dest / "JPEGImages" / f"{image_id}.jpg").symlink_to(root / "JPEGImages" / f"{image_id}.jpg")
        (dest / "SegmentationClassAug" / f"{image_id}.png").symlink_to(root / "SegmentationClassAug" / f"{image_id}.png")
    (dest / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return dest, ids
