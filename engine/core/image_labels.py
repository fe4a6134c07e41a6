"""Image-level labels read from a label file, for datasets without masks: the weak supervision of WSSS.

``read_image_labels`` turns a ``LabelSource`` (``engine.core.layouts``) into image id -> sorted
object class ids (label values of the ``ClassSet``; never the background). Formats:

- "onehot": ToCo's ``cls_labels_onehot.npy`` (rulixiang/ToCo datasets/coco.py and voc.py,
  ``np.load(p, allow_pickle=True).item()``): dict image id (str) -> ``(K,) float32``,
  K = ``len(classes.foreground)``, element k = class ``classes.foreground[k]``.
- "cls_labels": PSA/IRN's ``cls_labels.npy`` (jiwoon-ahn/psa, jiwoon-ahn/irn voc12/dataloader.py):
  the same vectors, keyed by int-encoded VOC ids (``2007000032`` -> ``2007_000032``, IRN's
  ``decode_int_filename``) or by str ids.
- "csv": one row per image, ``image_id,names...``; every column after the first holds class names,
  several in one column separated by ``;`` (``a.jpg,cat,dog`` = ``a.jpg,cat;dog``); blank cells
  and blank lines are skipped; a row with no names is an image with no object class; a first row
  whose first cell is ``image_id`` is a header.

A vector element > 0.5 counts as present. Both .npy formats are pickled dicts: ``np.load`` with
``allow_pickle`` runs code stored in the file, so only read files you trust.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cache.classes import ClassSet
from engine.core.layouts import DatasetError, LabelSource

PRESENT = 0.5  # a vector element above this counts as present (one-hot files hold 0.0 / 1.0)


def labels_from_vector(vector: np.ndarray, classes: ClassSet) -> tuple[int, ...]:
    """The object classes a label vector marks present.

    vector: ``(K,)`` numeric, K = ``len(classes.foreground)``; element k is class ``classes.foreground[k]``.
    Returns the sorted label values with element > 0.5. Raises ``ValueError`` naming the expected shape.
    """
    vector = np.asarray(vector)
    expected = (len(classes.foreground),)
    if vector.shape != expected or vector.dtype.kind not in "biuf":
        raise ValueError(f"expected a {expected} numeric vector, got shape {vector.shape} dtype {vector.dtype}")
    return tuple(classes.foreground[k] for k in np.flatnonzero(vector > PRESENT))


def decode_voc_int_id(key: int) -> str:
    """PSA/IRN's int-encoded VOC id as a file stem: ``2007000032`` -> ``"2007_000032"``."""
    digits = str(int(key))
    if key < 0 or len(digits) < 5:
        raise ValueError(f"{key} is not an int-encoded VOC id (YYYYNNNNNN)")
    return f"{digits[:4]}_{digits[4:]}"


def read_image_labels(source: LabelSource, classes: ClassSet) -> dict[str, tuple[int, ...]]:
    """Image id -> sorted object class ids (label values), in file order.

    source.kind: "onehot", "cls_labels" or "csv" ("masks" has no label file: ``ValueError``).
    Raises ``DatasetError`` naming the file (the key, or the line for CSV) when it is missing,
    unreadable or malformed: a vector of the wrong length, an undecodable key, an id given twice,
    an unknown class name.
    """
    if source.kind == "csv":
        return _read_csv(source.path, classes)
    if source.kind in ("onehot", "cls_labels"):
        return _read_npy_dict(source.path, classes, int_keys=source.kind == "cls_labels")
    raise ValueError(f"no label file for label source {source.kind!r}")


def _load_pickled_dict(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: image-level label file is missing")
    try:
        data = np.load(path, allow_pickle=True)
        data = data.item() if isinstance(data, np.ndarray) and data.shape == () else data
    except Exception as exc:  # np.load raises OSError, ValueError, UnpicklingError... for a bad file
        raise DatasetError(f"{path}: cannot read the label file ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a pickled dict image id -> label vector, got {type(data).__name__}")
    return data


def _read_npy_dict(path: Path, classes: ClassSet, int_keys: bool) -> dict[str, tuple[int, ...]]:
    labels: dict[str, tuple[int, ...]] = {}
    for key, vector in _load_pickled_dict(path).items():
        try:
            if isinstance(key, str):
                image_id = key
            elif int_keys and isinstance(key, (int, np.integer)) and not isinstance(key, bool):
                image_id = decode_voc_int_id(key)
            else:
                kind = "a str or int-encoded VOC id" if int_keys else "a str image id"
                raise ValueError(f"expected {kind}, got {type(key).__name__}")
            labels_of = labels_from_vector(vector, classes)
        except ValueError as exc:
            raise DatasetError(f"{path}: key {key!r}: {exc}") from None
        if image_id in labels:
            raise DatasetError(f"{path}: key {key!r}: image {image_id} is given twice")
        labels[image_id] = labels_of
    return labels


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank row; ``DatasetError`` when the file cannot be read."""
    try:
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            for cells in reader:
                if any(c.strip() for c in cells):
                    yield reader.line_num, cells
    except FileNotFoundError:
        raise DatasetError(f"{path}: image-level label file is missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read the label file ({exc})") from exc


def _read_csv(path: Path, classes: ClassSet) -> dict[str, tuple[int, ...]]:
    object_names = {classes.names[c]: c for c in classes.foreground}
    labels: dict[str, tuple[int, ...]] = {}
    for index, (line, cells) in enumerate(_csv_rows(path)):
        image_id = cells[0].strip()
        if index == 0 and image_id.lower() == "image_id":
            continue
        where = f"{path}, line {line}"
        if not image_id:
            raise DatasetError(f"{where}: the first column (image id) is empty")
        if image_id in labels:
            raise DatasetError(f"{where}: image {image_id} is given twice")
        names = [n.strip() for cell in cells[1:] for n in cell.split(";") if n.strip()]
        unknown = [n for n in names if n not in object_names]
        if unknown:
            raise DatasetError(f"{where}: unknown object class {unknown[0]!r}; valid: {', '.join(object_names)}")
        labels[image_id] = tuple(sorted({object_names[n] for n in names}))
    return labels
