"""Reading a PASCAL VOC style dataset: the first step of the pipeline.

Any VOCdevkit-layout root works (Everingham et al., IJCV 2010)::

    JPEGImages/<id>.jpg                 RGB images
    SegmentationClassAug/<id>.png       ground truth, (H, W) uint8, 0-20 and 255 = ignore
    (or SegmentationClass/<id>.png)     used when SegmentationClassAug is absent
    ImageSets/Segmentation/<split>.txt  one image id per line

``scan_split`` validates every image of a split once (decodes the JPEG, checks the mask's mode,
size and values) and returns one ``ImageRecord`` per id; a bad image gets a record whose
``problem`` names the file and what is wrong, so one broken file never hides the others. The
image-level labels (classes 1-20 present in the mask) are the weak supervision of WSSS, as in the
``cls_labels`` of PSA (Ahn & Kwak, CVPR 2018) and IRN (Ahn et al., CVPR 2019).

Whole-dataset problems (root, folders or split list missing, an empty list) raise
``DatasetError`` instead.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cache.voc import IGNORE_INDEX, NUM_CLASSES
from engine.core.processes import process_pool
from engine.core.types import ImageError, Item, LabelResult

ENV_VOC_ROOT = "ISLE_VOC_ROOT"
MASK_FOLDERS = ("SegmentationClassAug", "SegmentationClass")  # first one present wins
_VALID_MASK_VALUES = np.array([*range(NUM_CLASSES), IGNORE_INDEX])
_MIN_PARALLEL = 64  # below this many images, starting worker processes costs more than it saves


class DatasetError(Exception):
    """A problem with the whole dataset or split; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageRecord:
    """One id of a split after validation.

    height, width: the image size (0 when the image cannot be read).
    labels: sorted foreground classes (1-20) in the mask; empty when ``problem`` is set.
    problem: None for a valid image, else ``"<file>: <what is wrong>"``.
    mask_path: None when the mask file is missing.
    """

    image_id: str
    split: str
    image_path: Path
    mask_path: Path | None
    height: int
    width: int
    labels: tuple[int, ...]
    problem: str | None = None


def default_voc_root() -> Path:
    """``$ISLE_VOC_ROOT`` if set, else the bundled ``<repo>/../shared/data/voc2012-animals``."""
    env = os.environ.get(ENV_VOC_ROOT)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    return (repo.parent / "shared" / "data" / "voc2012-animals").resolve()


def _split_folder(root: Path) -> Path:
    return Path(root) / "ImageSets" / "Segmentation"


def mask_folder(root: Path) -> Path:
    """The ground-truth folder of ``root``: ``SegmentationClassAug`` if present, else ``SegmentationClass``."""
    root = check_root(root)
    for name in MASK_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root}: no mask folder (expected {' or '.join(MASK_FOLDERS)})")


def check_root(root: Path) -> Path:
    """``root`` as a Path after checking it exists and holds ``JPEGImages``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist")
    if not (root / "JPEGImages").is_dir():
        raise DatasetError(f"{root / 'JPEGImages'}: image folder is missing")
    return root


def list_splits(root: Path) -> list[str]:
    """Sorted split names, one per ``ImageSets/Segmentation/<split>.txt``."""
    folder = _split_folder(check_root(root))
    splits = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    if not splits:
        raise DatasetError(f"{folder}: no split lists (<split>.txt)")
    return splits


def read_split_ids(root: Path, split: str) -> list[str]:
    """The image ids of ``split`` in file order (first token of each non-blank line).

    Raises ``DatasetError`` naming the list file when it is missing, holds no ids, repeats an id
    or holds an id that is not a plain file name.
    """
    path = _split_folder(Path(root)) / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: split list is missing")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split list holds no image ids")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise DatasetError(f"{path}: {len(repeated)} id(s) listed more than once: {repeated[:10]}")
    unsafe = [i for i in ids if "/" in i or "\\" in i or i in (".", "..")]
    if unsafe:
        raise DatasetError(f"{path}: ids must be plain file names, got {unsafe[:10]}")
    return ids


def image_labels(mask: np.ndarray) -> tuple[int, ...]:
    """Image-level labels of a mask.

    mask: ``(H, W)`` integer, values 0-20 and 255.
    Returns the sorted foreground classes (1-20) present, e.g. ``(8, 15)`` for cat + person.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
    present = np.flatnonzero(np.bincount(mask.ravel().astype(np.intp), minlength=256))
    return tuple(int(c) for c in present if 1 <= c < NUM_CLASSES)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file fully as ``(H, W, 3) uint8`` RGB.

    Raises ``ImageError`` naming the file when it is missing, not an image or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file is missing")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for a bad file
        raise ImageError(f"{path}: cannot decode image ({exc})") from exc


def _check_image(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image after decoding all of it at 1/8 scale (JPEG ``draft``).

    Reduced-scale decoding still reads every entropy-coded block, so a truncated or corrupt
    file fails here as it would in ``read_image``, at a fraction of the cost.
    """
    if not path.is_file():
        raise ImageError(f"{path}: image file is missing")
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except Exception as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from exc
    return height, width


def read_mask(path: Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as ``(H, W) uint8`` with values 0-20 and 255.

    expected_hw: the image size ``(H, W)`` the mask must match, if given.
    Raises ``ImageError`` naming the file when it is missing, corrupt, not single-channel
    (palette or 8-bit grayscale), of the wrong size, or holds values that are not VOC classes.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ImageError(f"{path}: mask must be single-channel (palette or 8-bit grey), got mode {image.mode}")
            mask = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path}: cannot decode mask ({exc})") from exc
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        (h, w), (eh, ew) = mask.shape, expected_hw
        raise ImageError(f"{path}: mask is {w}x{h} (WxH) but the image is {ew}x{eh}")
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    unknown = np.setdiff1d(present, _VALID_MASK_VALUES)
    if unknown.size:
        raise ImageError(f"{path}: unknown label values {unknown.tolist()} (valid: 0-20 and 255)")
    return mask


def _scan_one(image_id: str, split: str, image_path: Path, mask_path: Path) -> ImageRecord:
    """Validate one image and its mask; never raises for a bad file."""
    try:
        height, width = _check_image(image_path)
    except ImageError as exc:
        has_mask = mask_path.is_file()
        return ImageRecord(image_id, split, image_path, mask_path if has_mask else None, 0, 0, (), str(exc))
    if not mask_path.is_file():
        problem = f"{mask_path}: mask file is missing"
        return ImageRecord(image_id, split, image_path, None, height, width, (), problem)
    try:
        labels = image_labels(read_mask(mask_path, (height, width)))
    except ImageError as exc:
        return ImageRecord(image_id, split, image_path, mask_path, height, width, (), str(exc))
    return ImageRecord(image_id, split, image_path, mask_path, height, width, labels)


def _scan_chunk(jobs: list[tuple[str, str, Path, Path]]) -> list[ImageRecord]:
    return [_scan_one(*job) for job in jobs]


def scan_split(root: Path, split: str, processes: int = 2) -> list[ImageRecord]:
    """Validate every image of ``split``; one ``ImageRecord`` per id, in list order.

    Bad images come back with ``problem`` set; ``DatasetError`` only for whole-dataset problems.
    processes: worker processes for decoding (spawned; used for splits of 64 images or more).
    """
    root = check_root(root)
    masks = mask_folder(root)
    ids = read_split_ids(root, split)
    jobs = [(i, split, root / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids]
    if processes <= 1 or len(jobs) < _MIN_PARALLEL:
        return _scan_chunk(jobs)
    size = math.ceil(len(jobs) / (processes * 8))  # a few chunks per process balance the load
    chunks = [jobs[k : k + size] for k in range(0, len(jobs), size)]
    with process_pool(processes) as pool:
        return [record for chunk in pool.map(_scan_chunk, chunks) for record in chunk]


def to_item(record: ImageRecord) -> Item:
    """The ``Item`` plugins receive for a valid record; ``ValueError`` for a record with a problem."""
    if record.problem is not None:
        raise ValueError(f"image {record.image_id} is not valid: {record.problem}")
    return Item(
        image_id=record.image_id,
        image_path=record.image_path,
        mask_path=record.mask_path,
        labels=record.labels,
        height=record.height,
        width=record.width,
    )


def label_image_file(image_id: str, image_path: Path, label: Callable[[np.ndarray], LabelResult]) -> LabelResult:
    """``label(rgb)`` for the ``(H, W, 3) uint8`` image at ``image_path``, or ``LabelResult(error=...)``
    naming the file when it cannot be read: one image of a per-image job."""
    try:
        rgb = read_image(image_path)
    except ImageError as exc:
        return LabelResult(image_id, error=str(exc))
    return label(rgb)


def label_each(items: Iterable[Item], label: Callable[[np.ndarray, Item], LabelResult]) -> Iterator[LabelResult]:
    """``label(rgb, item)`` for each item in order, ``rgb`` its ``(H, W, 3) uint8`` image.

    An image that cannot be read gives ``LabelResult(error=...)`` naming the file instead, and the
    others go on: what a method's labelling loop yields to the worker.
    """
    for item in items:
        yield label_image_file(item.image_id, item.image_path, lambda rgb: label(rgb, item))
