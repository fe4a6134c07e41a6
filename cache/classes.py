"""The class set of a dataset: class names, colour palette, ignore index and background.

A class set is data, read when a dataset is registered and stored with it in the cache
(``datasets.classes``); every plugin, numeric function, network head, query, page and export
takes it from the dataset. Label maps are ``(H, W) uint8``: label value = index into ``names``,
255 = ignore (object borders in the ground truth, undecided pixels in a pseudo-label).

Sources: the PASCAL VOC 2012 classes (VOCdevkit ``VOCcode/VOClabelcolormap.m``; Everingham et
al., IJCV 2010), the MS COCO 2014 classes as ToCo and MCTformer number them, a ``classes.txt`` (one name a line, line index = label value; the format of
ToCo's and MCTformer's COCO class lists) or CVAT's ``labelmap.txt`` (``name:r,g,b:parts:actions``).
Colours default to the VOC bit pattern, which covers all 256 label values.

Background is label 0 or absent (``background=None``: a street-scene class set where 0 is a
real class). Methods that derive background from a score threshold need it (``registry``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255
MAX_CLASSES = IGNORE_INDEX  # label values 0-254; 255 is reserved for ignore
BACKGROUND_NAMES = ("background", "_background_", "bg")


class ClassSetError(ValueError):
    """A class list that cannot be used; the message names the file (if any) and the problem."""


def bit_palette() -> np.ndarray:
    """The VOC colour map extended to every label value: ``(256, 3) uint8``; 255 is cream."""
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


@dataclass(frozen=True)
class ClassSet:
    """The classes of one dataset.

    names: one per label value (index = value), 1 to 255 of them, unique and non-empty.
    background: 0 when label 0 is background, None when every label is a real class.
    colours: one ``(r, g, b)`` per name; empty = the VOC bit pattern.
    Raises ``ClassSetError`` for an invalid list.
    """

    names: tuple[str, ...]
    background: int | None = 0
    colours: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= len(self.names) <= MAX_CLASSES:
            raise ClassSetError(f"a class set has 1-{MAX_CLASSES} classes, got {len(self.names)}")
        blank = [i for i, n in enumerate(self.names) if not str(n).strip()]
        if blank:
            raise ClassSetError(f"class names must not be empty (label values {blank})")
        seen: dict[str, int] = {}
        for i, n in enumerate(self.names):
            if n in seen:
                raise ClassSetError(f"class name {n!r} is used by label values {seen[n]} and {i}")
            seen[n] = i
        if self.background not in (0, None):
            raise ClassSetError(f"background must be label 0 or absent, got {self.background}")
        if self.background == 0 and len(self.names) < 2:
            raise ClassSetError("a class set with background needs at least one object class")
        if self.colours and len(self.colours) != len(self.names):
            raise ClassSetError(f"{len(self.colours)} colours for {len(self.names)} classes")

    # -- sizes and ids ----------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Label values in use, background included: the width of a segmentation head."""
        return len(self.names)

    @property
    def has_background(self) -> bool:
        return self.background is not None

    @property
    def foreground(self) -> tuple[int, ...]:
        """The label values an image-level label can name (all but background), ascending."""
        return tuple(c for c in range(self.num_classes) if c != self.background)

    @property
    def first_object(self) -> int:
        """The smallest object label value: 1 with background, else 0."""
        return 0 if self.background is None else 1

    def object_index(self, class_id: int) -> int:
        """Position of object class ``class_id`` in ``foreground`` (a classifier's row)."""
        return int(class_id) - self.first_object

    @functools.cached_property
    def valid_values(self) -> np.ndarray:
        """Every value a label map may hold: ``(num_classes + 1,) int64`` (the classes and 255)."""
        return np.array([*range(self.num_classes), IGNORE_INDEX], dtype=np.int64)

    def unknown_values(self, label: np.ndarray) -> list[int]:
        """Values of ``label`` that are neither a class nor 255, ascending."""
        present = np.flatnonzero(np.bincount(np.asarray(label).ravel().astype(np.intp), minlength=256))
        return np.setdiff1d(present, self.valid_values).tolist()

    def valid_range(self) -> str:
        """How an error message names the valid values, e.g. ``"0-20 and 255"``."""
        return f"0-{self.num_classes - 1} and {IGNORE_INDEX}"

    # -- names and colours ------------------------------------------------------------------

    def name(self, class_id: int) -> str:
        """The name of ``class_id``; ``"ignore"`` for 255; ``KeyError`` for another value."""
        if class_id == IGNORE_INDEX:
            return "ignore"
        if not 0 <= class_id < self.num_classes:
            raise KeyError(f"label value {class_id} is not a class (valid: {self.valid_range()})")
        return self.names[class_id]

    def index(self, name: str) -> int:
        """The label value of ``name``; ``KeyError`` naming the valid names otherwise."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown class {name!r}; valid: {', '.join(self.names)}") from None

    def describe(self, classes: Iterable[int]) -> str:
        """``"8 (cat), 15 (person)"``; values outside the set are printed bare."""
        return ", ".join(f"{c} ({self.names[c]})" if 0 <= c < self.num_classes else str(c)
                         for c in classes) or "none"

    @functools.cached_property
    def palette(self) -> np.ndarray:
        """``(256, 3) uint8`` colour of every label value (255 = ignore)."""
        palette = bit_palette()
        if self.colours:
            palette[: self.num_classes] = np.asarray(self.colours, dtype=np.uint8)
        return palette

    # -- storage ----------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "background": self.background,
                           "colours": [list(c) for c in self.colours]})

    @classmethod
    def from_json(cls, text: str) -> ClassSet:
        data = json.loads(text)
        return cls(tuple(data["names"]), data["background"], tuple(tuple(c) for c in data.get("colours", ())))


VOC = ClassSet((
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
))


# MS COCO 2014 as WSSS repositories number it (ToCo, MCTformer): background + the 80 thing classes
# in the official category order, label value = position (COCO's category ids have gaps).
COCO = ClassSet((
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
))


def _background_of(names: Sequence[str], background: int | None | str) -> int | None:
    if background == "auto":
        return 0 if names and names[0].strip().lower() in BACKGROUND_NAMES else None
    return background  # type: ignore[return-value]


def from_names(names: Sequence[str], background: int | None | str = "auto",
               colours: Sequence[tuple[int, int, int]] = ()) -> ClassSet:
    """A class set from names in label-value order; background ``"auto"`` (label 0 is background
    when named like it: ``BACKGROUND_NAMES``), 0 or None. Raises ``ClassSetError``."""
    names = tuple(str(n).strip() for n in names)
    return ClassSet(names, _background_of(names, background), tuple(tuple(c) for c in colours))


def read_classes_txt(path: Path, background: int | None | str = "auto") -> ClassSet:
    """A class set from ``classes.txt``: one name a line, line index = label value.

    background: ``"auto"`` (label 0 is background when its name is one of ``BACKGROUND_NAMES``),
    0 or None. Blank trailing lines are ignored. Raises ``ClassSetError`` naming the file.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassSetError(f"{path}: cannot read the class list ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    try:
        return from_names(lines, background)
    except ClassSetError as exc:
        raise ClassSetError(f"{path}: {exc}") from None


def read_cvat_labelmap(path: Path, background: int | None | str = "auto") -> ClassSet:
    """A class set from CVAT's ``labelmap.txt`` (Segmentation mask 1.1 export).

    Lines ``name:r,g,b:parts:actions`` in label-value order; ``#`` lines are comments. The
    colours become the palette. Raises ``ClassSetError`` naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassSetError(f"{path}: cannot read the label map ({exc})") from exc
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        try:
            rgb = tuple(int(v) for v in fields[1].split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except (IndexError, ValueError):
            raise ClassSetError(f"{path}, line {number}: expected 'name:r,g,b:parts:actions', got {line!r}") from None
        names.append(fields[0].strip())
        colours.append(rgb)  # type: ignore[arg-type]
    try:
        return from_names(names, background, colours)
    except ClassSetError as exc:
        raise ClassSetError(f"{path}: {exc}") from None


def from_folder(folder: Path, background: int | None | str = "auto") -> ClassSet | None:
    """The class set a data folder declares: ``classes.txt`` or CVAT's ``labelmap.txt``, else None."""
    folder = Path(folder)
    if (folder / "classes.txt").is_file():
        return read_classes_txt(folder / "classes.txt", background)
    if (folder / "labelmap.txt").is_file():
        return read_cvat_labelmap(folder / "labelmap.txt", background)
    return None
