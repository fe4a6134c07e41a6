"""Class score maps between plugins: resizing, storing, and the argmax that makes a label map.

A plugin's scores are ``(K, h, w)`` float maps, channel k for class ``classes[k]`` (0 =
background when present); the worker stores them as float16 at a reduced size so refinements
(dCRF, random walk, SVM) and the ISLE merge can start from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def argmax_label(scores: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Label map ``classes[argmax_k scores[k]]``: ``(K, H, W)`` -> ``(H, W) uint8``.

    Ties go to the lower channel (to the background when it is channel 0, as IRN ``eval_cam``).
    Raises ``ValueError`` unless there is one channel per class.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] != len(classes):
        raise ValueError(f"expected scores of shape ({len(classes)}, H, W) for classes {tuple(classes)}, "
                         f"got {scores.shape}")
    return np.asarray(classes, dtype=np.uint8)[np.argmax(scores, axis=0)]


def downsample_scores(scores: np.ndarray, max_side: int) -> np.ndarray:
    """``(K, H, W)`` scores -> ``(K, h, w) float16`` with ``max(h, w) <= max_side`` (area average).

    Unchanged size (only the dtype) when the map already fits.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape (K, H, W), got {scores.shape}")
    height, width = scores.shape[1:]
    if max(height, width) <= max_side:
        return scores.astype(np.float16)
    scale = max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))  # long side = max_side
    small = F.interpolate(torch.from_numpy(scores)[None], size=size, mode="area")[0]
    return small.numpy().astype(np.float16)


def resize_channels(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` float maps to ``(K, height, width) float32`` (PIL, per channel)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (K, h, w), got {maps.shape}")
    if maps.shape[1:] == (height, width):
        return maps
    return np.stack(
        [np.asarray(Image.fromarray(m, mode="F").resize((width, height), Image.BILINEAR)) for m in maps]
    )


def strided_to_image(maps: torch.Tensor, stride: int, scaled_hw: tuple[int, int],
                     image_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample a network's strided output of a rescaled image onto the original grid.

    maps: ``(K, h, w) float32`` (CAMs, features, walked scores), computed with ``stride`` on an
    image resized to ``scaled_hw``; the map covers ``h * stride`` scaled pixels (the network pads
    the bottom/right), so it is upsampled to that extent in original pixels and cropped (IRN's
    ``strided_up_size`` crop). Returns ``(K, H, W) float32``, ``(H, W) = image_hw``.
    """
    (height, width), (sh, sw) = image_hw, scaled_hw
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (K, h, w), got {tuple(maps.shape)}")
    out_h = max(height, round(maps.shape[1] * stride * height / sh))
    out_w = max(width, round(maps.shape[2] * stride * width / sw))
    up = F.interpolate(maps[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    return up[:, :height, :width]
