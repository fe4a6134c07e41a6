"""Where a dataset's files are: the first step of the pipeline, before any image is read.

``detect_layout`` turns a folder or a description file into a ``Layout``: the class set, the
source of the image-level labels and, per split, the name list and the path templates of images
and masks. Three layouts are known:

- VOCdevkit (Everingham et al., IJCV 2010): ``JPEGImages/<id>.jpg``,
  ``SegmentationClassAug/<id>.png`` (else ``SegmentationClass/``, else no ground truth),
  ``ImageSets/Segmentation/<split>.txt``; without masks the labels come from a PSA/IRN
  ``cls_labels.npy`` at the root.
- COCO 2014 as ToCo (rulixiang/ToCo datasets/coco.py) and MCTformer (xulianuwa/MCTformer
  datasets.py) read it: ``coco2014/{train2014,val2014}/<id>.jpg``,
  ``SegmentationClass/{train2014,val2014}/<id>.png``, name lists ``train.txt``/``val.txt``/
  ``val_part.txt`` (ToCo) or ``train_id.txt``/``val_id.txt`` (MCTformer) in ``lists/`` or the
  root; without masks the labels come from ToCo's ``cls_labels_onehot.npy`` beside the lists.
- A description file (``dataset.toml`` or ``dataset.json``, same keys) for any other layout::

      name = "streets"                      # optional; default: the root folder's name
      root = "."                            # optional; relative to this file's folder
      classes = "classes.txt"               # classes.txt / labelmap.txt path, a list of names, "voc" or "coco"
      background = "auto"                   # "auto" | 0 | "none"
      images = "images/{split}/{id}.jpg"    # templates relative to root; {split} and {id}
      masks = "masks/{split}/{id}.png"      # optional: omit for no ground truth
      [labels]                              # optional; default from = "masks"
      from = "onehot"                       # masks | onehot | cls_labels | csv
      path = "lists/cls_labels_onehot.npy"  # required unless from = "masks"
      [splits.train]
      list = "lists/train.txt"              # one image id per line
      images = "train/{id}.jpg"             # optional per-split override (masks likewise)

  Every path except ``root`` is relative to the root. Everything is checked when the file is
  read; each problem raises ``DatasetError`` naming the file and the field.

Whole-dataset problems raise ``DatasetError``; a bad single image is the reader's business.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import classes as class_lists
from cache.classes import ClassSet, ClassSetError

DESCRIPTION_NAMES = ("dataset.toml", "dataset.json")
LABEL_KINDS = ("masks", "onehot", "cls_labels", "csv")
VOC_MASK_FOLDERS = ("SegmentationClassAug", "SegmentationClass")  # first one present wins
COCO_SPLIT_LISTS = (  # split name -> list files, first present wins (ToCo, then MCTformer)
    ("train", ("train.txt", "train_id.txt")),
    ("val", ("val.txt", "val_id.txt")),
    ("val_part", ("val_part.txt",)),
)
BUILT_IN = {"voc": class_lists.VOC, "coco": class_lists.COCO}  # class sets a description may name
_TOP_KEYS = ("name", "root", "classes", "background", "images", "masks", "labels", "splits")
_LABEL_KEYS = ("from", "path")
_SPLIT_KEYS = ("list", "images", "masks")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class DatasetError(Exception):
    """A problem with the whole dataset or split; the message names the path (and field) and the problem."""


@dataclass(frozen=True)
class SplitLayout:
    """One split: its name list and where its files are.

    images, masks: path templates relative to the root holding ``{id}``, e.g.
    ``"JPEGImages/{id}.jpg"``; ``masks`` is None when the split has no ground truth.
    """

    name: str
    list_path: Path
    images: str
    masks: str | None


@dataclass(frozen=True)
class LabelSource:
    """Where the image-level labels come from: ``kind`` in ``LABEL_KINDS``; ``path`` None for masks."""

    kind: str
    path: Path | None


@dataclass(frozen=True)
class Layout:
    """A dataset's files: ``kind`` is "vocdevkit", "coco2014" or "description" (then ``description``
    is the file); ``name`` is for display."""

    root: Path
    kind: str
    description: Path | None
    classes: ClassSet
    labels: LabelSource
    splits: tuple[SplitLayout, ...]
    name: str = ""

    def split(self, name: str) -> SplitLayout:
        """The split called ``name``; ``DatasetError`` listing the valid names otherwise."""
        for split in self.splits:
            if split.name == name:
                return split
        valid = ", ".join(s.name for s in self.splits)
        raise DatasetError(f"{self.root}: unknown split {name!r}; valid: {valid}")

    def image_path(self, split: SplitLayout, image_id: str) -> Path:
        return self.root / split.images.replace("{id}", image_id)

    def mask_path(self, split: SplitLayout, image_id: str) -> Path | None:
        return None if split.masks is None else self.root / split.masks.replace("{id}", image_id)

    @property
    def layout_name(self) -> str:
        """``"vocdevkit"``, ``"coco2014"`` or the description file's path."""
        return str(self.description) if self.description is not None else self.kind


def detect_layout(path: Path) -> Layout:
    """The layout of ``path``: a description file, a folder holding one, a VOCdevkit or a COCO 2014 folder.

    Raises ``DatasetError`` naming ``path`` when it is missing or matches no layout.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: dataset root does not exist")
    path = path.resolve()
    if path.is_file():
        if path.suffix in (".toml", ".json"):
            return read_description(path)
        raise DatasetError(f"{path}: not a dataset folder or a description file (.toml or .json)")
    descriptions = [path / n for n in DESCRIPTION_NAMES if (path / n).is_file()]
    if len(descriptions) > 1:
        raise DatasetError(f"{path}: holds both {' and '.join(DESCRIPTION_NAMES)}; keep one")
    if descriptions:
        return read_description(descriptions[0])
    if (path / "JPEGImages").is_dir():
        return _vocdevkit(path)
    if (path / "coco2014" / "train2014").is_dir() or (path / "coco2014" / "val2014").is_dir():
        return _coco2014(path)
    raise DatasetError(f"{path}: no dataset layout found (looked for {' or '.join(DESCRIPTION_NAMES)}, "
                       "a VOCdevkit JPEGImages/ folder, a COCO 2014 coco2014/train2014 or coco2014/val2014 folder)")


def read_split_ids(split: SplitLayout) -> list[str]:
    """The usable image ids of ``split`` in file order (``read_split_entries`` without the refused
    lines)."""
    return read_split_entries(split)[0]


def read_split_entries(split: SplitLayout) -> tuple[list[str], list[tuple[int, str]]]:
    """``(ids, refused)`` of ``split``'s list: the first token of each non-blank line in file order,
    and ``(line number, entry)`` of every entry that is not a plain file name (``..``, a slash, a
    backslash: it could lead out of the dataset root), refused unread so the rest stays usable.

    Raises ``DatasetError`` naming the list file when it is missing or unreadable, holds no usable
    ids, or repeats an id.
    """
    path = split.list_path
    if not path.is_file():
        raise DatasetError(f"{path}: split list is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the split list ({exc})") from exc
    ids, refused = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        entry = line.split()[0]
        if "/" in entry or "\\" in entry or entry in (".", ".."):
            refused.append((number, entry))
        else:
            ids.append(entry)
    if not ids:
        detail = f" ({len(refused)} entries refused: not plain file names)" if refused else ""
        raise DatasetError(f"{path}: split list holds no image ids{detail}")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise DatasetError(f"{path}: {len(repeated)} id(s) listed more than once: {repeated[:10]}")
    return ids, refused


def refused_entry_problem(split: SplitLayout, number: int, entry: str) -> str:
    """The problem recorded for a refused list entry: the list file, the line and the entry."""
    return f"{split.list_path}, line {number}: {entry!r} is not a plain file name; refused unread"


# -- automatic layouts ----------------------------------------------------------------------


def _folder_classes(root: Path) -> ClassSet | None:
    try:
        return class_lists.from_folder(root)
    except ClassSetError as exc:
        raise DatasetError(str(exc)) from None


def _vocdevkit(root: Path) -> Layout:
    mask_folder = next((n for n in VOC_MASK_FOLDERS if (root / n).is_dir()), None)
    list_folder = root / "ImageSets" / "Segmentation"
    lists = sorted(list_folder.glob("*.txt")) if list_folder.is_dir() else []
    if not lists:
        raise DatasetError(f"{list_folder}: no split lists (<split>.txt)")
    if mask_folder is not None:
        labels = LabelSource("masks", None)
    elif (root / "cls_labels.npy").is_file():
        labels = LabelSource("cls_labels", root / "cls_labels.npy")
    else:
        raise DatasetError(f"{root}: no masks ({' or '.join(VOC_MASK_FOLDERS)}) and no image-level "
                           "label file (cls_labels.npy)")
    masks = None if mask_folder is None else f"{mask_folder}/{{id}}.png"
    splits = tuple(SplitLayout(p.stem, p, "JPEGImages/{id}.jpg", masks) for p in lists)
    return Layout(root, "vocdevkit", None, _folder_classes(root) or class_lists.VOC, labels, splits, root.name)


def _coco2014(root: Path) -> Layout:
    list_folder = root / "lists" if (root / "lists").is_dir() else root
    splits = []
    for name, files in COCO_SPLIT_LISTS:
        found = next((list_folder / f for f in files if (list_folder / f).is_file()), None)
        if found is None:
            continue
        year = "train2014" if name.startswith("train") else "val2014"
        has_masks = (root / "SegmentationClass" / year).is_dir()
        masks = f"SegmentationClass/{year}/{{id}}.png" if has_masks else None
        splits.append(SplitLayout(name, found, f"coco2014/{year}/{{id}}.jpg", masks))
    if not splits:
        expected = ", ".join(f for _, files in COCO_SPLIT_LISTS for f in files)
        raise DatasetError(f"{list_folder}: no split lists (expected one of {expected})")
    classes = _folder_classes(root) or class_lists.COCO
    onehot = list_folder / "cls_labels_onehot.npy"
    if (root / "SegmentationClass").is_dir():
        labels = LabelSource("masks", None)
    elif onehot.is_file():
        labels = LabelSource("onehot", onehot)
    else:
        raise DatasetError(f"{root}: no masks (SegmentationClass) and no image-level label file ({onehot})")
    return Layout(root, "coco2014", None, classes, labels, tuple(splits), root.name)


# -- description files ----------------------------------------------------------------------


class _Fields:
    """Reads and checks the fields of one description file; every error names the file and field."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def error(self, field: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.path}: field {field!r}: {problem}")

    def check_keys(self, table: dict[str, Any], prefix: str, valid: tuple[str, ...]) -> None:
        for key in table:
            if key not in valid:
                raise self.error(prefix + key, f"unknown key; valid: {', '.join(valid)}")

    def table(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(field, f"expected a table, got {value!r}")
        return value

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, f"expected a non-empty string, got {value!r}")
        return value

    def file(self, root: Path, value: Any, field: str) -> Path:
        relative = self.string(value, field)
        path = root / relative
        if not path.is_file():
            raise self.error(field, f"file {relative} does not exist")
        return path

    def template(self, value: Any, field: str, placeholders: tuple[str, ...]) -> str:
        """A path template after checking it holds ``{id}`` and only ``placeholders``."""
        template = self.string(value, field)
        names = _PLACEHOLDER.findall(template)
        unknown = [n for n in names if n not in placeholders]
        if unknown:
            raise self.error(field, f"unknown placeholder {{{unknown[0]}}} in {template!r}; "
                                    f"valid: {', '.join('{' + p + '}' for p in placeholders)}")
        rest = _PLACEHOLDER.sub("", template)
        if "{" in rest or "}" in rest:
            raise self.error(field, f"unbalanced brace in {template!r}")
        if "id" not in names:
            raise self.error(field, f"template {template!r} has no {{id}}")
        return template


def _load_description(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the description ({exc})") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:  # the message ends "(at line L, column C)"
        raise DatasetError(f"{path}: invalid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def _background(fields: _Fields, value: Any) -> int | None | str:
    # bool is an int in Python: `background = false` must not pass as 0
    if value == "auto" or (type(value) is int and value == 0):
        return value
    if value == "none":
        return None
    raise fields.error("background", f"expected \"auto\", 0 or \"none\", got {value!r}")


def _classes(fields: _Fields, root: Path, value: Any, background: int | None | str) -> ClassSet:
    try:
        built_in = isinstance(value, str) and value in BUILT_IN
        if built_in or isinstance(value, list):
            names = BUILT_IN[value].names if built_in else tuple(value)
            if not all(isinstance(n, str) for n in names):
                raise fields.error("classes", "a class list holds names (strings) only")
            return class_lists.from_names(names, background)
        path = fields.file(root, value, "classes")
        read = class_lists.read_cvat_labelmap if path.name == "labelmap.txt" else class_lists.read_classes_txt
        return read(path, background)
    except ClassSetError as exc:
        raise fields.error("classes", str(exc)) from None


def _labels(fields: _Fields, root: Path, value: Any) -> LabelSource:
    table = fields.table(value, "labels")
    fields.check_keys(table, "labels.", _LABEL_KEYS)
    kind = table.get("from", "masks")
    if kind not in LABEL_KINDS:
        raise fields.error("labels.from", f"unknown label source {kind!r}; valid: {', '.join(LABEL_KINDS)}")
    if kind == "masks":
        if "path" in table:
            raise fields.error("labels.path", "not used with from = \"masks\" (the masks are the labels)")
        return LabelSource("masks", None)
    if "path" not in table:
        raise fields.error("labels.path", f"required with from = {kind!r}")
    return LabelSource(kind, fields.file(root, table["path"], "labels.path"))


def _split(fields: _Fields, root: Path, name: str, value: Any, images: str | None,
           masks: str | None) -> SplitLayout:
    prefix = f"splits.{name}"
    if not _SPLIT_NAME.fullmatch(name):
        raise fields.error(prefix, "split names use letters, digits, '_', '-' and '.' only")
    table = fields.table(value, prefix)
    fields.check_keys(table, prefix + ".", _SPLIT_KEYS)
    if "list" not in table:
        raise fields.error(prefix + ".list", "required (the file listing the split's image ids)")
    list_path = fields.file(root, table["list"], prefix + ".list")
    if "images" in table:
        images = fields.template(table["images"], prefix + ".images", ("split", "id"))
    if images is None:
        raise fields.error(prefix + ".images", "required when there is no top-level 'images' template")
    if "masks" in table:
        masks = fields.template(table["masks"], prefix + ".masks", ("split", "id"))
    return SplitLayout(name, list_path, images.replace("{split}", name),
                       None if masks is None else masks.replace("{split}", name))


def read_description(path: Path) -> Layout:
    """The layout a description file (TOML or JSON; keys in the module docstring) declares.

    Raises ``DatasetError`` naming the file, and the field when one is at fault: unreadable or
    invalid file, unknown or missing keys, bad templates, missing files, a class list
    ``ClassSet`` refuses, an unknown label source, ``from = "masks"`` without mask templates.
    """
    path = Path(path).resolve()
    fields = _Fields(path, _load_description(path))
    data = fields.data
    fields.check_keys(data, "", _TOP_KEYS)
    for required in ("classes", "splits"):
        if required not in data:
            raise fields.error(required, "required key is missing")
    name = fields.string(data["name"], "name") if "name" in data else None
    root = path.parent
    if "root" in data:
        root = (root / fields.string(data["root"], "root")).resolve()
        if not root.is_dir():
            raise fields.error("root", f"folder {data['root']} does not exist")
    background = _background(fields, data.get("background", "auto"))
    classes = _classes(fields, root, data["classes"], background)
    labels = _labels(fields, root, data.get("labels", {}))
    images = fields.template(data["images"], "images", ("split", "id")) if "images" in data else None
    masks = fields.template(data["masks"], "masks", ("split", "id")) if "masks" in data else None
    split_tables = fields.table(data["splits"], "splits")
    if not split_tables:
        raise fields.error("splits", "no splits declared (add a [splits.<name>] table)")
    splits = tuple(_split(fields, root, n, v, images, masks) for n, v in split_tables.items())
    if labels.kind == "masks":
        no_masks = [s.name for s in splits if s.masks is None]
        if no_masks:
            raise fields.error("masks", f"labels come from the masks (labels.from = \"masks\", the default) "
                                        f"but split(s) {', '.join(no_masks)} have no masks template")
    return Layout(root, "description", path, classes, labels, splits, name or root.name)
