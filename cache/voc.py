"""PASCAL VOC 2012 class names and colour palette.

Source: the VOCdevkit development kit (Everingham et al., IJCV 2010), ``VOCcode/VOClabelcolormap.m``.
Label maps everywhere in ISLE Workbench are ``(H, W) uint8`` with values 0-20 (these classes) and
255 (ignore: object borders in the ground truth, undecided pixels in a pseudo-label).
"""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)  # 21, background included
IGNORE_INDEX = 255


def voc_palette() -> np.ndarray:
    """The VOC colour map: ``(256, 3) uint8``; index 255 (ignore) is cream (224, 224, 192)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()
