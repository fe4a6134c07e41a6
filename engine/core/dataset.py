"""Reading a dataset's images: the first step of the pipeline after its layout.

``engine.core.layouts`` says where the files are (VOCdevkit, COCO 2014 as ToCo/MCTformer lay
it out, or a description file) and which class set the dataset has. ``scan_split`` validates
every image of a split once (decodes the JPEG, checks the mask's mode, size and values against
the class set) and returns one ``ImageRecord`` per id; a bad image gets a record whose
``problem`` names the file and what is wrong, so one broken file never hides the others. A split
list entry that is not a plain file name (``../../etc/passwd``) is refused unread and gets a
problem record naming the list file and line; the other entries are scanned.

The image-level labels are the weak supervision of WSSS, as in the ``cls_labels`` of PSA (Ahn &
Kwak, CVPR 2018) and IRN (Ahn et al., CVPR 2019): the object classes present in the mask, or,
for a dataset without masks, read from its label file (``engine.core.image_labels``). An image
without a mask is usable: it gets pseudo-labels, and no figure counts it.

Whole-dataset problems (root, folders or split list missing, an empty list, a malformed
description or label file) raise ``DatasetError`` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from cache.classes import ClassSet
from engine.core.image_labels import read_image_labels
from engine.core.layouts import (DatasetError, Layout, SplitLayout, detect_layout, read_split_entries,
                                 refused_entry_problem)
from engine.core.processes import process_pool
from engine.core.types import ImageError, Item, LabelResult

__all__ = ["DatasetError", "ImageRecord", "check_root", "default_voc_root", "image_labels", "label_each",
           "label_image_file", "list_splits", "mask_values", "open_layout", "read_image", "read_mask",
           "scan_chunks", "scan_split", "to_item"]

ENV_VOC_ROOT = "ISLE_VOC_ROOT"
T = TypeVar("T")
_MIN_PARALLEL = 64  # below this many images, starting worker processes costs more than it saves
CHUNK = 2048  # image records a scan hands over at a time


@dataclass(frozen=True)
class ImageRecord:
    """One id of a split after validation.

    height, width: the image size (0 when the image cannot be read).
    labels: sorted object class ids (label values) of the image; empty when ``problem`` is set.
    problem: None for a valid image, else ``"<file>: <what is wrong>"``.
    mask_path: None when the image has no ground truth.
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


def open_layout(root: Path) -> Layout:
    """The layout of ``root`` (a dataset folder or a description file); ``DatasetError`` when it
    is none of the known layouts or its description is malformed."""
    return detect_layout(Path(root))


def check_root(root: Path) -> Path:
    """``root`` as a Path after checking it is a readable dataset (``open_layout``)."""
    open_layout(root)
    return Path(root)


def list_splits(root: Path) -> list[str]:
    """The split names of the dataset at ``root``, in layout order."""
    return [split.name for split in open_layout(root).splits]


def image_labels(mask: np.ndarray, classes: ClassSet) -> tuple[int, ...]:
    """Image-level labels of a mask.

    mask: ``(H, W)`` integer label values; classes: the dataset's class set.
    Returns the sorted object classes present (never background or 255), e.g. ``(8, 15)`` for
    cat + person in VOC.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
    return image_labels_of(np.flatnonzero(np.bincount(mask.ravel().astype(np.intp), minlength=256)), classes)


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


_JPEG_END = b"\xff\xd9"  # EOI; inside entropy-coded data 0xFF is always stuffed, so it only ends a stream
_TAIL = 1024  # bytes searched for EOI: encoders may pad after it


def _check_image(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image after a structural check: the header parses, and the file is whole
    (a JPEG ends with its end-of-image marker; other formats pass PIL's ``verify``).

    Registration reads every image, so it does not decode the pixels (the JPEG decode was three
    quarters of its time): a truncated or unreadable file fails here; a JPEG whose entropy data is
    garbled but whole fails when a method first decodes it (``read_image``), as a per-image error
    naming the file.
    """
    if not path.is_file():
        raise ImageError(f"{path}: image file is missing")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - _TAIL))
                    if _JPEG_END not in f.read():
                        raise ImageError(f"{path}: image file is truncated (no JPEG end-of-image marker)")
            else:
                image.verify()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from exc
    return height, width


def _decode_mask(path: Path, expected_hw: tuple[int, int] | None, read: Callable[[Image.Image], T]) -> T:
    """``read(image)`` of the mask at ``path`` after the checks every mask read makes."""
    if not path.is_file():
        raise ImageError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ImageError(f"{path}: mask must be single-channel (palette or 8-bit grey), got mode {image.mode}")
            if expected_hw is not None and image.size[::-1] != tuple(expected_hw):
                (w, h), (eh, ew) = image.size, expected_hw
                raise ImageError(f"{path}: mask is {w}x{h} (WxH) but the image is {ew}x{eh}")
            return read(image)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path}: cannot decode mask ({exc})") from exc


def _check_values(path: Path, present: np.ndarray, classes: ClassSet | None) -> None:
    unknown = [] if classes is None else np.setdiff1d(present, classes.valid_values).tolist()
    if unknown:
        raise ImageError(f"{path}: unknown label values {unknown} (valid: {classes.valid_range()})")


def read_mask(path: Path, expected_hw: tuple[int, int] | None = None, classes: ClassSet | None = None) -> np.ndarray:
    """Read a ground-truth mask as ``(H, W) uint8`` label values (255 = ignore).

    expected_hw: the image size ``(H, W)`` the mask must match, if given.
    classes: the class set its values must belong to; None skips that check (a mask already
    validated when its dataset was registered).
    Raises ``ImageError`` naming the file when it is missing, corrupt, not single-channel
    (palette or 8-bit grayscale), of the wrong size, or holds values that are not classes.
    """
    path = Path(path)
    mask = _decode_mask(path, expected_hw, lambda image: np.asarray(image, dtype=np.uint8))
    if classes is not None:
        _check_values(path, np.flatnonzero(np.bincount(mask.ravel(), minlength=256)), classes)
    return mask


def mask_values(path: Path, expected_hw: tuple[int, int] | None = None, classes: ClassSet | None = None) -> np.ndarray:
    """The label values present in a mask, ascending ``(K,) int64``: ``read_mask``'s checks and
    errors, from PIL's histogram (the decoded pixels never become an array: registration reads
    every mask once, and this halves its cost)."""
    path = Path(path)
    present = np.flatnonzero(_decode_mask(path, expected_hw, lambda image: image.histogram()))
    _check_values(path, present, classes)
    return present


def image_labels_of(present: np.ndarray, classes: ClassSet) -> tuple[int, ...]:
    """The object classes among the label values ``present`` (background and 255 dropped)."""
    objects = set(classes.foreground)
    return tuple(int(c) for c in present if c in objects)


_ScanJob = tuple[str, str, Path, "Path | None", "tuple[int, ...] | None", ClassSet]


def _scan_one(image_id: str, split: str, image_path: Path, mask_path: Path | None,
              labels: tuple[int, ...] | None, classes: ClassSet) -> ImageRecord:
    """Validate one image and its mask; never raises for a bad file.

    labels: the image's labels from the dataset's label file, or None to take them from the mask
    (which is then required).
    """
    has_mask = mask_path is not None and mask_path.is_file()
    try:
        height, width = _check_image(image_path)
    except ImageError as exc:
        return ImageRecord(image_id, split, image_path, mask_path if has_mask else None, 0, 0, (), str(exc))
    if labels is None and not has_mask:
        problem = f"{mask_path}: mask file is missing"
        return ImageRecord(image_id, split, image_path, None, height, width, (), problem)
    if not has_mask:
        return ImageRecord(image_id, split, image_path, None, height, width, labels)
    try:
        present = mask_values(mask_path, (height, width), classes)
    except ImageError as exc:
        return ImageRecord(image_id, split, image_path, mask_path, height, width, (), str(exc))
    return ImageRecord(image_id, split, image_path, mask_path, height, width,
                       image_labels_of(present, classes) if labels is None else labels)


def _scan_chunk(jobs: list[_ScanJob]) -> list[ImageRecord]:
    return [_scan_one(*job) for job in jobs]


def _scan_jobs(layout: Layout, split: str) -> tuple[list[_ScanJob], set[str], list[ImageRecord]]:
    """What validating each id of ``split`` needs, the ids the label file does not list, and a
    problem record per refused list entry (``refused_records``)."""
    part = layout.split(split)
    ids, refused = read_split_entries(part)
    listed = None if layout.labels.kind == "masks" else read_image_labels(layout.labels, layout.classes)
    unlisted = set() if listed is None else {i for i in ids if i not in listed}
    jobs = [(i, split, layout.image_path(part, i), layout.mask_path(part, i),
             None if listed is None else listed.get(i, ()), layout.classes) for i in ids]
    return jobs, unlisted, refused_records(part, refused)


def refused_records(part: SplitLayout, refused: list[tuple[int, str]]) -> list[ImageRecord]:
    """One problem ``ImageRecord`` per refused list entry, nothing read: its id is
    ``<list file name>:<line>`` (the entry itself is no safe id), its path the list file."""
    return [ImageRecord(f"{part.list_path.name}:{number}", part.name, part.list_path, None, 0, 0, (),
                        refused_entry_problem(part, number, entry)) for number, entry in refused]


def scan_chunks(root: Path | Layout, split: str, processes: int = 2, chunk: int = CHUNK) -> Iterator[list[ImageRecord]]:
    """Validate every image of ``split``, yielding ``ImageRecord`` lists of at most ``chunk`` ids
    in list order, so a caller can record them as they come and memory stays flat in the
    number of images.

    root: a dataset folder or description file, or its ``Layout``. Bad images come back with
    ``problem`` set (an image the label file does not list, too); ``DatasetError`` only for
    whole-dataset problems, raised before the first chunk.
    processes: worker processes for decoding (spawned; used for splits of 64 images or more).
    """
    layout = root if isinstance(root, Layout) else open_layout(root)
    jobs, unlisted, refused = _scan_jobs(layout, split)
    if refused:
        yield refused

    def finish(records: list[ImageRecord]) -> list[ImageRecord]:
        return [_unlisted(r, layout) if r.image_id in unlisted and r.problem is None else r for r in records]

    if processes <= 1 or len(jobs) < _MIN_PARALLEL:
        for k in range(0, len(jobs), chunk):
            yield finish(_scan_chunk(jobs[k : k + chunk]))
        return
    # A few pieces per process balance the load; pieces never exceed a chunk.
    size = max(1, min(chunk, math.ceil(len(jobs) / (processes * 8))))
    pieces = (jobs[k : k + size] for k in range(0, len(jobs), size))
    with process_pool(processes) as pool:
        pending: list[ImageRecord] = []
        for records in pool.map(_scan_chunk, pieces):
            pending.extend(records)
            if len(pending) >= chunk:
                yield finish(pending[:chunk])
                pending = pending[chunk:]
        if pending:
            yield finish(pending)


def scan_split(root: Path | Layout, split: str, processes: int = 2) -> list[ImageRecord]:
    """Every ``ImageRecord`` of ``split`` in list order (``scan_chunks`` in one list)."""
    return [record for records in scan_chunks(root, split, processes) for record in records]


def _unlisted(record: ImageRecord, layout: Layout) -> ImageRecord:
    problem = f"{layout.labels.path}: no image-level labels for {record.image_id}"
    return ImageRecord(record.image_id, record.split, record.image_path, record.mask_path,
                       record.height, record.width, (), problem)


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
