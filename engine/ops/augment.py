"""Training augmentation shared by every trainable plugin: random rescale, flip and crop.

PSA (Ahn & Kwak, CVPR 2018, Sec. 4.1) and IRN (Ahn et al., CVPR 2019, ``voc12/dataloader.py``,
``misc/imutils.py``: ``random_resize_long``, ``random_lr_flip``, ``random_crop``); isim Sec. 4.1.
The same draws move an image and its label map (pseudo-label, affinity label) together.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cache.classes import IGNORE_INDEX

PAD_VALUE = 128  # uint8 fill for crops larger than the image: ~0 after to_input, like IRN's zero padding


def augment(rgb: np.ndarray, rng: np.random.Generator, resize_long: tuple[int, int], crop_size: int) -> np.ndarray:
    """PSA/IRN training augmentation: random long-side rescale, horizontal flip, random crop.

    rgb: ``(H, W, 3) uint8``. The long side is resized to an integer drawn uniformly from
    ``resize_long`` (inclusive, bilinear), the image flipped with probability 0.5, then a
    ``crop_size`` square is cut at a random place; where the image is smaller, the crop is padded
    with ``PAD_VALUE`` (IRN ``random_crop``). Returns ``(crop_size, crop_size, 3) uint8``.
    """
    return augment_with_label(rgb, None, rng, resize_long, crop_size)[0]


def augment_with_label(rgb: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                       resize_long: tuple[int, int], crop_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``augment`` applied to an image and its label map alike (IRN/isim segmentation loaders).

    label: ``(h, w) uint8`` label map of the same image at any resolution (same aspect), or
    None. It is resized (nearest) to the rescaled image's size, flipped and cropped with it; crop
    padding is ``IGNORE_INDEX`` (255). Returns ``(crop_size, crop_size, 3) uint8`` and
    ``(crop_size, crop_size) uint8`` (or None). The random draws are those of ``augment``.
    Raises ``ValueError`` for an image that is not ``(H, W, 3)`` or a label that is not 2-D.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    if label is not None and label.ndim != 2:
        raise ValueError(f"expected an (h, w) label, got {label.shape}")
    height, width = rgb.shape[:2]
    long_side = int(rng.integers(resize_long[0], resize_long[1] + 1))
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    height, width = image.shape[:2]
    out = np.full((crop_size, crop_size, 3), PAD_VALUE, dtype=np.uint8)
    # Offsets as in IRN: the larger of (image, crop) is cut, the smaller placed at random in it.
    dy, dx = int(rng.integers(abs(height - crop_size) + 1)), int(rng.integers(abs(width - crop_size) + 1))
    src_y, dst_y = (dy, 0) if height > crop_size else (0, dy)
    src_x, dst_x = (dx, 0) if width > crop_size else (0, dx)
    h, w = min(height, crop_size), min(width, crop_size)
    out[dst_y : dst_y + h, dst_x : dst_x + w] = image[src_y : src_y + h, src_x : src_x + w]
    if label is None:
        return out, None
    out_label = np.full((crop_size, crop_size), IGNORE_INDEX, dtype=np.uint8)
    out_label[dst_y : dst_y + h, dst_x : dst_x + w] = label[src_y : src_y + h, src_x : src_x + w]
    return out, out_label
