"""Small copies of images and label maps on disk, so a grid page decodes thumbnails, not originals.

A thumbnail lives under ``<cache dir>/thumbs/<size>/`` named by a hash of the source's resolved
path, modification time and size: a re-made label map (same path, new file) gets a new thumbnail,
and an old one is never served for it. Files are written to a temporary name and renamed, so a
page killed mid-write leaves no half file. Images shrink with Lanczos filtering (``(h, w, 3)
uint8`` RGB, JPEG); label maps by nearest neighbour, so no blended class value appears (``(h, w)
uint8``, palette PNG). The longer side becomes ``size`` pixels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cache.labelmaps import (
    LabelMapError,
    atomic_target,
    read_label_map,
    write_label_map,
)


class ThumbnailError(ValueError):
    """A source that cannot be shown; the message names the file and the problem."""


THUMB_SIZE = 192  # pixels on the longer side: four thumbnails fit a 1,000-pixel wide grid row


def _thumb_path(cache_dir: Path, source: Path, size: int, suffix: str) -> Path:
    """The thumbnail's file; raises ``ThumbnailError`` naming a missing source."""
    source = Path(source).resolve()
    try:
        stat = source.stat()
    except FileNotFoundError:
        raise ThumbnailError(f"{source}: file is missing") from None
    key = hashlib.sha1(f"{source}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()[:24]
    return Path(cache_dir) / "thumbs" / str(size) / key[:2] / f"{key}{suffix}"


def _shrunk(width: int, height: int, size: int) -> tuple[int, int]:
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_thumbnail(cache_dir: Path, source: Path, size: int = THUMB_SIZE) -> np.ndarray:
    """``(h, w, 3) uint8`` RGB, longer side ``size``, of the image file ``source``.

    Raises ``ThumbnailError`` naming a missing or corrupt image.
    """
    path = _thumb_path(cache_dir, source, size, ".jpg")
    if path.is_file():
        with Image.open(path) as cached:
            return np.asarray(cached.convert("RGB"))
    try:
        with Image.open(source) as image:
            target = _shrunk(*image.size, size)
            image.draft("RGB", target)  # a JPEG decodes at the nearest 1/2, 1/4, 1/8 scale above target
            thumb = image.convert("RGB").resize(target, Image.Resampling.LANCZOS)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for a bad file
        raise ThumbnailError(f"{source}: cannot decode image ({exc})") from exc
    tmp = atomic_target(path)
    thumb.save(tmp, format="JPEG", quality=88)
    os.replace(tmp, path)
    with Image.open(path) as saved:  # what a later hit returns, so the first look is the same
        return np.asarray(saved.convert("RGB"))


def label_thumbnail(cache_dir: Path, source: Path, size: int = THUMB_SIZE) -> np.ndarray:
    """``(h, w) uint8`` (label values, 255), longer side ``size``, of the label map or mask ``source``.

    Raises ``ThumbnailError`` naming a missing or unreadable file.
    """
    path = _thumb_path(cache_dir, source, size, ".png")
    if path.is_file():
        return read_label_map(path)
    try:
        label = read_label_map(source)
    except LabelMapError as exc:
        raise ThumbnailError(str(exc)) from None
    small = np.asarray(Image.fromarray(label).resize(_shrunk(label.shape[1], label.shape[0], size),
                                                     Image.Resampling.NEAREST))
    write_label_map(path, small)
    return small
