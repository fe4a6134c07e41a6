"""Inputs the benchmarks (and tests) derive from the bundled real data."""

from __future__ import annotations

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
