"""Label maps and class scores on disk.

Label maps are palette ("P" mode) PNGs, ``(H, W) uint8`` label values and 255 (ignore), coloured
with the dataset's palette (``cache.classes``);
class scores are ``.npz`` files holding ``classes: (K,) int16`` and ``scores: (K, h, w) float16``.
Files are written to a temporary name and renamed, so a killed process never leaves half a file
under the final name. Their paths are recorded only in DuckDB (``cache/queries.py``).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from cache.classes import ClassSet, bit_palette

_BIT_PALETTE = bit_palette().flatten().tolist()


class LabelMapError(ValueError):
    """A label map file that cannot be used; the message names the file and the problem."""


class DiskFull(RuntimeError):
    """No space left (or the quota reached) where a label map or scores file was being written.

    Not a per-image problem: the job stops (its finished images stay recorded) and resumes once
    space is freed. The partial temporary file is removed; the final name was never touched.
    """


_FULL = {errno.ENOSPC, errno.EDQUOT}


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary name for ``path``, renamed onto it when the block succeeds and removed when it
    fails; ``DiskFull`` naming the file and the free space for a full device or quota."""
    tmp = atomic_target(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            free = shutil.disk_usage(path.parent).free
            raise DiskFull(f"{path}: no space left on its device ({free:,} bytes free; {exc.strerror}). Free "
                           "space, then queue the job again: it resumes at its first image not recorded") from exc
        raise


def atomic_target(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process and thread (the app's sessions are
    threads of one process and may write the same thumbnail at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_label_map(path: Path, label: np.ndarray, classes: ClassSet | None = None) -> None:
    """Write ``label: (H, W) uint8`` as a palette PNG at ``path``.

    classes: the class set its values must belong to, whose palette colours the file; None
    (a map already checked, e.g. a thumbnail) skips the check and uses the VOC bit pattern.
    Raises ``LabelMapError`` naming the file for a wrong shape, dtype or label value, and
    ``DiskFull`` when the device or quota is full.
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise LabelMapError(f"{path}: expected a (H, W) uint8 label map, got {label.shape} {label.dtype}")
    if classes is not None:
        bad = classes.unknown_values(label)
        if bad:
            raise LabelMapError(f"{path}: label values {bad} are not classes ({classes.valid_range()})")
    image = Image.fromarray(label, mode="P")
    image.putpalette(_BIT_PALETTE if classes is None else classes.palette.flatten().tolist())
    with _atomic(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)  # zlib's fastest: label maps are flat regions


def read_label_map(path: Path) -> np.ndarray:
    """Read a label map PNG (palette or single-channel) as ``(H, W) uint8``.

    Raises ``LabelMapError`` naming the file when it is missing, unreadable or not single-channel.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelMapError(f"{path}: label map file is missing")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise LabelMapError(f"{path}: expected a palette or grayscale PNG, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except LabelMapError:
        raise
    except Exception as exc:  # PIL raises many types for a corrupt file
        raise LabelMapError(f"{path}: cannot decode label map ({exc})") from exc


def write_scores(path: Path, classes: tuple[int, ...], scores: np.ndarray) -> None:
    """Store ``scores: (K, h, w)`` for ``classes`` (K ids, 0 = background) as float16."""
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] != len(classes):
        raise LabelMapError(f"{path}: expected scores of shape ({len(classes)}, h, w), got {scores.shape}")
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, classes=np.asarray(classes, np.int16), scores=scores.astype(np.float16))


def read_scores(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(classes, (K, h, w) float32)`` from a scores file written by ``write_scores``."""
    path = Path(path)
    if not path.is_file():
        raise LabelMapError(f"{path}: scores file is missing")
    with np.load(path) as data:
        return tuple(int(c) for c in data["classes"]), data["scores"].astype(np.float32)
