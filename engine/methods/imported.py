"""Imported pseudo-labels (method ``import``): a folder of label maps or class scores made elsewhere.

ISLE starts by *collecting* the pseudo-labels of its candidate methods (Ostrowski & Shafique,
ISLE, shared/papers/isle-class-wise-ensemble.md, Sec. 3 and Fig. 2, stage 1; Sec. 4 uses the CLIMS
labels "as provided by the official GitHub"). An imported variant is stored, counted and refined
like any other; its name is the one the user gives (``Step.title``).

In: one file per image of the split, ``<image id>.<format>``:
- ``png``: a label map, palette ("P") or 8-bit grey ("L"), ``(H, W)`` label values of the
  dataset's class set and 255, the image's size (IRN ``step/make_sem_seg_labels.py``, PuzzleCAM ``make_pseudo_labels.py``).
- ``npy``: the pickled dict of IRN ``step/make_cam.py`` (``keys`` = class id - 1; ``high_res``,
  ``cam``) or PuzzleCAM ``inference_classification.py`` / ``inference_rw.py`` (``keys`` = class ids
  with a leading 0; ``hr_cam``, ``rw``): per-class scores in [0, 1]; with one channel per key the
  background is a constant ``bg_threshold`` channel (IRN ``eval_cam.py``), with one more it is
  channel 0. Pseudo-label = argmax, ties to the background.
Out: label ``(H, W) uint8``; for npy also scores ``(K + 1, h, w) float16``. Every file is
validated (missing, unreadable, wrong size, values that are not classes or 255, a class absent
from the image's labels, keys that do not match the channels); a bad file is an error result naming it.

``np.load(allow_pickle=True)`` runs the pickle in the file: the folder is a local path the user
chose (the trust of running the WSSS code that wrote it). The variant is keyed by the folder path
and the settings, not the files' contents. Measurements: docs/methods/imported.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache.labelmaps import LabelMapError, read_label_map
from cache.classes import ClassSet
from engine.core import registry
from engine.core.chains import Step
from engine.core.registry import Offer, Role
from engine.core.types import Item, LabelResult, RunContext
from engine.ops.scores import argmax_label, downsample_scores

FORMATS = ("png", "npy")
# Score keys tried in this order when ``score_key`` is None. Full-resolution maps come before
# ``cam``, which IRN and PuzzleCAM store at stride 4 next to ``high_res`` / ``hr_cam``.
SCORE_KEYS = ("hr_cam", "high_res", "rw", "cam")
# ``keys`` conventions: "index" = 0-based object indices, class id = key + 1 (IRN
# make_cam: ``torch.nonzero(label)[:, 0]``, read back with ``keys + 1``); "class_id" = class
# ids, a leading 0 standing for the background (PuzzleCAM: ``np.pad(keys + 1, (1, 0))``).
KEY_CONVENTIONS = ("index", "class_id")
# Background threshold per score key when ``bg_threshold`` is None: IRN ``cam_eval_thres`` = 0.15
# for CAMs (run_sample.py, step/eval_cam.py); IRN ``sem_seg_bg_thres`` = 0.25 for random-walk
# scores (step/make_sem_seg_labels.py), also PuzzleCAM make_pseudo_labels.py ``--threshold``.
DEFAULT_BG_THRESHOLDS = {"hr_cam": 0.15, "high_res": 0.15, "cam": 0.15, "rw": 0.25}


@dataclass(frozen=True)
class ImportConfig:
    """Where the pseudo-labels are and how to read them. Nothing is trained: no CPU budget.

    The npy settings (``score_key``, ``bg_threshold``, ``keys``) must stay at their defaults for
    png, so one folder read one way is one variant.
    """

    # absolute path of the folder holding <image id>.<format>; a user's path (engine.core.roots)
    folder: str = field(default="", metadata={"path": "read"})
    format: str = "png"  # "png" (label maps) or "npy" (WSSS score dicts)
    score_key: str | None = None  # npy: which scores to read; None = first of SCORE_KEYS present
    bg_threshold: float | None = None  # npy: constant background score; None = DEFAULT_BG_THRESHOLDS
    keys: str = "index"  # npy: KEY_CONVENTIONS ("index": IRN, class id = key + 1)
    score_max_side: int = 128  # stored npy scores are downsampled so max(h, w) <= this

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"import: format must be one of {FORMATS}, got {self.format!r}")
        if self.score_key is not None and self.score_key not in SCORE_KEYS:
            raise ValueError(f"import: score_key must be one of {SCORE_KEYS} or None, got {self.score_key!r}")
        if self.keys not in KEY_CONVENTIONS:
            raise ValueError(f"import: keys must be one of {KEY_CONVENTIONS}, got {self.keys!r}")
        if self.bg_threshold is not None:
            if not 0.0 <= self.bg_threshold <= 1.0:
                raise ValueError(f"import: bg_threshold must be in [0, 1], got {self.bg_threshold}")
            object.__setattr__(self, "bg_threshold", float(self.bg_threshold))  # 0 and 0.0: one variant
        if self.score_max_side < 1:
            raise ValueError(f"import: score_max_side must be >= 1, got {self.score_max_side}")
        if self.format == "png" and (self.score_key, self.bg_threshold, self.keys) != (None, None, "index"):
            raise ValueError("import: score_key, bg_threshold and keys apply to format 'npy' only")


# --------------------------------------------------------------------------------------------
# Numerics and checks (pure functions)


def check_size(hw: tuple[int, ...], image_hw: tuple[int, int], what: str) -> None:
    """Raise ``ValueError`` unless ``hw == image_hw`` (both ``(H, W)``); messages say WxH."""
    if tuple(hw) != tuple(image_hw):
        (h, w), (ih, iw) = hw, image_hw
        raise ValueError(f"{what} is {w}x{h} (WxH) but the image is {iw}x{ih}")


def check_classes(classes: Sequence[int], image_labels: Sequence[int], class_set: ClassSet) -> None:
    """Raise ``ValueError`` when an object class of ``classes`` is not an image label."""
    absent = sorted({int(c) for c in classes} & set(class_set.foreground) - set(image_labels))
    if absent:
        raise ValueError(f"class(es) {class_set.describe(absent)} not among the image's labels "
                         f"{class_set.describe(sorted(image_labels))}")


def check_label(label: np.ndarray, image_hw: tuple[int, int], image_labels: Sequence[int], class_set: ClassSet) -> None:
    """Validate an imported label map against its image.

    label: ``(H, W) uint8``. Raises ``ValueError`` when its size differs from ``image_hw``, a value
    is neither a class of ``class_set`` nor 255, or an object class is not in ``image_labels``.
    """
    check_size(label.shape, image_hw, "label map")
    unknown = class_set.unknown_values(label)
    if unknown:
        raise ValueError(f"label values {unknown} are not classes (valid: {class_set.valid_range()})")
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    check_classes(present.tolist(), image_labels, class_set)


def class_ids(keys: Any, convention: str, num_classes: int) -> tuple[int, ...]:
    """Object class ids (1..C-1) from the ``keys`` of a WSSS npy dict, in channel order.

    keys: 1-D integers (array, list or torch tensor). convention: ``"index"`` (class id = key +
    1, IRN) or ``"class_id"`` (keys are class ids; a leading 0 is the background, PuzzleCAM).
    num_classes: C of the class set, background 0 included.
    Raises ``ValueError`` for keys that are not 1-D integers, map outside 1..C-1, or repeat.
    """
    if convention not in KEY_CONVENTIONS:
        raise ValueError(f"keys convention must be one of {KEY_CONVENTIONS}, got {convention!r}")
    try:
        array = np.asarray(keys)
    except Exception as exc:
        raise ValueError(f"'keys' is not an array of class keys ({exc})") from None
    integral = array.dtype.kind in "iu" or (array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0))
    if array.ndim != 1 or not integral:
        raise ValueError(f"'keys' must be 1-D integers, got shape {array.shape} dtype {array.dtype}")
    ids = array.astype(np.int64)
    if convention == "index":
        ids = ids + 1
    elif ids.size and ids[0] == 0:
        ids = ids[1:]
    bad = [int(k) for k in ids if not 1 <= k < num_classes]
    if bad:
        raise ValueError(f"'keys' {array.tolist()} read as keys={convention!r} give class ids {bad} "
                         f"outside 1-{num_classes - 1}")
    if len(set(ids.tolist())) != ids.size:
        raise ValueError(f"'keys' {array.tolist()} repeat a class")
    return tuple(int(k) for k in ids)


def with_background(scores: np.ndarray, n_classes: int, threshold: float) -> np.ndarray:
    """Scores with the background channel first: ``(K + 1, H, W) float32``.

    scores: ``(K, H, W)`` (one channel per class: a constant ``threshold`` channel is put first,
    IRN ``eval_cam``) or ``(K + 1, H, W)`` (background already first: returned as is).
    Raises ``ValueError`` for any other channel count.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape (K, H, W), got {scores.shape}")
    if scores.shape[0] == n_classes + 1:
        return scores
    if scores.shape[0] != n_classes:
        raise ValueError(f"{scores.shape[0]} score channel(s) for {n_classes} class key(s): expected "
                         f"{n_classes} (background added) or {n_classes + 1} (background first)")
    background = np.full((1, *scores.shape[1:]), threshold, dtype=np.float32)
    return np.concatenate([background, scores])


def npy_scores(data: Mapping[str, Any], score_key: str | None, convention: str,
               bg_threshold: float | None, num_classes: int) -> tuple[str, tuple[int, ...], np.ndarray]:
    """``(score key used, classes (0, *foreground), scores (K + 1, H, W) float32)`` of a WSSS npy dict.

    data: ``{"keys": K class keys, <score key>: (K or K + 1, H, W) scores in [0, 1]}``.
    score_key: the entry to read, or None for the first of ``SCORE_KEYS`` present.
    bg_threshold: the constant background score, or None for ``DEFAULT_BG_THRESHOLDS[key]``.
    num_classes: of the class set (background 0 included).
    Raises ``ValueError`` (naming what is wrong, not the file) for a missing entry, bad keys,
    non-finite scores or scores outside [0, 1], or channels that do not match the keys.
    """
    present = [k for k in SCORE_KEYS if k in data]
    key = score_key or (present[0] if present else None)
    if key is None or key not in data:
        wanted = repr(score_key) if score_key else f"any of {list(SCORE_KEYS)}"
        raise ValueError(f"no score entry {wanted}; the dict holds {sorted(map(str, data))}")
    if "keys" not in data:
        raise ValueError(f"no 'keys' entry; the dict holds {sorted(map(str, data))}")
    classes = class_ids(data["keys"], convention, num_classes)
    try:
        raw = np.asarray(data[key], dtype=np.float32)
    except Exception as exc:
        raise ValueError(f"scores {key!r} are not numeric ({exc})") from None
    if raw.ndim != 3:
        raise ValueError(f"scores {key!r} must be (K, H, W), got shape {raw.shape}")
    if raw.size and not np.isfinite(raw).all():
        raise ValueError(f"scores {key!r} hold NaN or infinite values")
    if raw.size and (raw.min() < 0.0 or raw.max() > 1.0):
        raise ValueError(f"scores {key!r} range {raw.min():.4g}..{raw.max():.4g}, outside [0, 1]")
    threshold = DEFAULT_BG_THRESHOLDS[key] if bg_threshold is None else bg_threshold
    try:
        scores = with_background(raw, len(classes), threshold)
    except ValueError as exc:
        raise ValueError(f"scores {key!r}: {exc}") from None
    return key, (0, *classes), scores


# --------------------------------------------------------------------------------------------
# Files


def load_npy_dict(path: Path) -> Mapping[str, Any]:
    """The dict pickled in a ``.npy`` file (``np.save(path, dict)``); trusted local file, see the
    module docstring. Raises ``LabelMapError`` naming the file when it is missing, unreadable or
    not a dict."""
    if not path.is_file():
        raise LabelMapError(f"{path}: pseudo-label file is missing")
    try:
        data = np.load(path, allow_pickle=True)
    except Exception as exc:  # numpy and pickle raise many types for a bad file
        raise LabelMapError(f"{path}: cannot read .npy ({type(exc).__name__}: {exc})") from None
    if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0:
        data = data.item()
    if not isinstance(data, Mapping):
        what = f"an array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise LabelMapError(f"{path}: expected a dict {{'keys': ..., <score key>: (K, H, W)}}, got {what}")
    return data


def import_png(path: Path, item: Item, classes: ClassSet) -> LabelResult:
    """One image's label map from a PNG; ``LabelMapError`` (names the file) or ``ValueError``."""
    label = read_label_map(path)
    check_label(label, (item.height, item.width), item.labels, classes)
    return LabelResult(item.image_id, label=label)


def import_npy(path: Path, item: Item, cfg: ImportConfig, class_set: ClassSet) -> LabelResult:
    """One image's label and scores from a WSSS npy dict; ``LabelMapError`` or ``ValueError``."""
    key, classes, scores = npy_scores(load_npy_dict(path), cfg.score_key, cfg.keys, cfg.bg_threshold,
                                      class_set.num_classes)
    check_size(scores.shape[1:], (item.height, item.width), f"scores {key!r}")
    try:
        check_classes(classes, item.labels, class_set)
    except ValueError as exc:
        raise ValueError(f"{exc} (keys read as keys={cfg.keys!r})") from None
    label = argmax_label(scores, classes)
    return LabelResult(item.image_id, label=label, scores=downsample_scores(scores, cfg.score_max_side),
                       score_classes=classes)


def import_step(folder: str | Path, name: str = "", **params: Any) -> Step:
    """The chain step importing ``folder`` as a variant named ``name`` (default: the folder's name).

    The folder is resolved to an absolute path (the worker may run from another directory) and
    checked before anything is queued. params: further ``ImportConfig`` fields (format, ...).
    Raises ``FileNotFoundError`` when the folder does not exist and ``ValueError`` for invalid
    params or a folder holding no file of the format.
    """
    path = Path(folder).expanduser().resolve()
    params = {**params, "folder": str(path)}
    registry.get("import").make_config(params)  # invalid settings fail here, not in the worker
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: folder does not exist")
    fmt = params.get("format", ImportConfig.format)
    if next(path.glob(f"*.{fmt}"), None) is None:
        others = [f for f in FORMATS if f != fmt and next(path.glob(f"*.{f}"), None) is not None]
        hint = f" (it holds .{others[0]} files: format {others[0]!r}?)" if others else ""
        raise ValueError(f"{path}: no .{fmt} files{hint}")
    return Step("import", params, title=name.strip() or path.name)


@registry.register("import", role=Role.METHOD, config=ImportConfig, title="Imported", offers={Offer.IMPORT})
def run(cfg: ImportConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """One result per ``ctx.todo`` image from ``<folder>/<image id>.<format>``.

    Raises ``ValueError`` (the job fails) when the folder is not an absolute path to a directory;
    a bad file is an error result naming it.
    """
    folder = Path(cfg.folder)
    if not cfg.folder or not folder.is_absolute() or not folder.is_dir():
        raise ValueError(f"import: folder {cfg.folder!r} is not an existing absolute directory path")
    if cfg.format == "npy" and not ctx.classes.has_background:
        raise ValueError("import: npy score dicts (IRN, PuzzleCAM) put a background channel first, but this "
                         "dataset's class set has no background; import label maps (format 'png') instead")
    for item in ctx.todo:
        path = folder / f"{item.image_id}.{cfg.format}"
        try:
            yield (import_png(path, item, ctx.classes) if cfg.format == "png"
                   else import_npy(path, item, cfg, ctx.classes))
        except LabelMapError as exc:  # already names the file
            yield LabelResult(item.image_id, error=str(exc))
        except ValueError as exc:
            yield LabelResult(item.image_id, error=f"{path}: {exc}")
