"""Export a variant (an ISLE ensemble or any other) as a VOCdevkit-style folder for any DeepLab
trainer, with a ``provenance.json`` saying where every label came from.

Layout written under ``dest`` (what IRN, PuzzleCAM and mmsegmentation's VOC-aug configs read)::

    SegmentationClassAug/<id>.png       the pseudo-labels: palette PNGs, (H, W) label values and 255
    classes.txt                         the dataset's class names, line index = label value
    ImageSets/Segmentation/<split>.txt  the exported image ids, one per line
    JPEGImages/<id>.jpg                 symlinks to the dataset's images (``images="copy"``: copies;
                                        ``"none"``: left out)
    provenance.json                     the variant, its chain, and the caller's details (for ISLE:
                                        candidates, assignment and its rule, overlap rule, predicted
                                        and exact per-class IoU, conflict counts (``assignments.
                                        summary``), cross-validated gain and per-class confidence
                                        (``assignments.validate``))


The label PNGs are the cached files copied byte for byte, so importing ``SegmentationClassAug``
back (``python -m engine import``) gives a variant with identical label maps and counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import queries
from cache.db import connect

from .assignments import Saved, merge_step, rebuild, step_variant_id, summary, validate

IMAGE_MODES = ("link", "copy", "none")
LABEL_FOLDER = "SegmentationClassAug"


class ExportError(ValueError):
    """The export cannot be written; the message names the folder or variant and the problem."""


@dataclass(frozen=True)
class Exported:
    """What ``export_variant`` wrote: the folder, the image count, and images left out because
    the variant has no label map for them."""

    dest: Path
    images: int
    missing: list[str]


def export_variant(cache_dir: Path, variant_id: str, dest: Path, details: dict[str, Any] | None = None,
                   images: str = "link") -> Exported:
    """Write ``variant_id``'s label maps on its dataset's split as a VOCdevkit folder at ``dest``.

    The split is the one the variant's label job ran on (the images its label maps were made for).
    ``details`` is added to ``provenance.json`` under ``"details"``. ``dest`` must be empty or a
    previous export (it holds ``provenance.json``), which is replaced. Raises ``ExportError`` for
    an unknown variant, one without label maps, a non-empty foreign ``dest`` or a bad ``images``.
    """
    if images not in IMAGE_MODES:
        raise ExportError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()) and not (dest / "provenance.json").is_file():
        raise ExportError(f"{dest}: folder is not empty and not a previous export (no provenance.json)")
    cache_dir = Path(cache_dir)
    with connect(cache_dir, read_only=True) as con:
        variant = queries.get_variant(con, variant_id)
        if variant is None:
            raise ExportError(f"no variant {variant_id!r} in the cache {cache_dir}")
        dataset = queries.get_dataset(con, variant.dataset_id)
        rows = queries.label_map_rows(con, variant_id)
        split = queries.variant_split(con, variant_id)
        usable = queries.usable_images(con, variant.dataset_id, split)
    if not rows or split is None:
        raise ExportError(f"variant {variant.name} ({variant_id}) has no label maps to export")
    exported = [r for r in usable if r.image_id in rows]
    missing = [r.image_id for r in usable if r.image_id not in rows]

    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / LABEL_FOLDER).mkdir(parents=True)
    (staging / "ImageSets" / "Segmentation").mkdir(parents=True)
    if images != "none":
        (staging / "JPEGImages").mkdir()
    for r in exported:
        image_id = r.image_id
        shutil.copyfile(cache_dir / rows[image_id][0], staging / LABEL_FOLDER / f"{image_id}.png")
        if images == "link":
            os.symlink(Path(r.image_path).resolve(), staging / "JPEGImages" / Path(r.image_path).name)
        elif images == "copy":
            shutil.copyfile(r.image_path, staging / "JPEGImages" / Path(r.image_path).name)
    (staging / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{r.image_id}\n" for r in exported))
    # The class list travels with the labels, so registering the export reads it with its names.
    (staging / "classes.txt").write_text("".join(f"{name}\n" for name in dataset.classes.names))
    provenance = {
        "variant": {k: getattr(variant, k) for k in ("id", "name", "method", "source_id", "code_version")}
        | {"steps": list(variant.steps)},
        "dataset": {"id": dataset.id, "root": dataset.root, "layout": dataset.layout,
                    "classes": list(dataset.classes.names), "background": dataset.classes.background},
        "split": split,
        "images": len(exported), "missing_label_maps": missing, "exported_at": time.time(),
        "layout": {"labels": LABEL_FOLDER, "list": f"ImageSets/Segmentation/{split}.txt", "images": images},
        "details": details or {},
    }
    (staging / "provenance.json").write_text(json.dumps(provenance, indent=2, default=_json_default))
    # Swap in the finished folder: an interrupted export never leaves a half folder under dest.
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return Exported(dest=dest, images=len(exported), missing=missing)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def export_assignment(cache_dir: Path, dataset_id: str, split: str, saved: Saved, dest: Path,
                      images: str = "link") -> Exported:
    """Export the exact merge of a saved ISLE assignment with its ``summary`` (candidates,
    assignment, rules, predicted and exact IoU, conflicts) and its off-sample figures
    (``validate``: cross-validated gain, per-class confidence) as provenance.

    Raises ``ExportError`` when that merge has not run on every image of the split yet.
    """
    with connect(cache_dir, read_only=True) as con:
        plan = rebuild(con, dataset_id, split, saved)
        variant_id = step_variant_id(dataset_id, merge_step(plan, saved.name))
        labelled = queries.labelled_in_split(con, dataset_id, split).get(variant_id, 0)
        total = len(queries.usable_images(con, dataset_id, split))
        if labelled < total:
            raise ExportError(f"the exact merge of assignment {saved.name!r} has {labelled} of {total} "
                              f"label maps on {split}: run it first")
        details = {"assignment": {"id": saved.id, "name": saved.name, "note": saved.note,
                                  "saved_at": saved.created_at, "rule": dataclasses.asdict(saved.assign)},
                   **dataclasses.asdict(summary(con, plan, variant_id)),
                   "off_sample": dataclasses.asdict(validate(con, plan))}
    return export_variant(cache_dir, variant_id, dest, details, images)
