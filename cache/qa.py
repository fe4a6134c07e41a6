"""Pseudo-label QA in SQL: find, sort and flag images from the cached counts alone.

Every sort key is one DuckDB aggregation over ``counts`` (or ``conflicts``, ``confusion``), per image; nothing
here decodes a label map, so a page of a 10,000-image split costs one query (``bench/qa_browse.py``).
Flags are the user's marks on images, stored in the ``flags`` table and written by the app.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cache.classes import IGNORE_INDEX
from cache.queries import Con, _dicts

FLAG_KINDS: dict[str, str] = {
    "wrong_gt": "wrong ground truth",
    "hard_case": "hard case",
    "method_failure": "method failure",
}
"""Flag kind -> what it says. A flag of kind ``wrong_gt`` is the usual reason to keep an image
out of the ISLE selection subset (``engine.isle.numerics.Subset.exclude``)."""

SORTS: dict[str, str] = {
    "image": "image id",
    "iou": "IoU in the variant (per image)",
    "errors": "error pixels in the variant",
    "disagreement": "disagreement between two variants",
    "gain": "IoU gain of the second variant over the first",
    "conflicts": "conflict pixels in an ISLE merge",
    "confusion": "pixels of a ground-truth class labelled as another class",
}
"""Sort key -> what it orders by. ``iou``, ``errors`` and ``conflicts`` need a variant;
``disagreement`` and ``gain`` a variant and another. With a class, the key is about that class
only; without, about the whole image (see ``find_images``). ``confusion`` needs a variant, the
ground-truth class (``class_id``) and what it was labelled as (``confused_as``): one cell of the
variant's class confusion (``confusion`` table) per image."""

DESCENDING = {"image": False, "iou": False, "errors": True, "disagreement": True, "gain": True, "conflicts": True,
              "confusion": True}
"""Each key's default direction: the image that most needs a look comes first."""

FLAG_FILTERS = ("any", "flagged", "unflagged", *FLAG_KINDS)

UNDECIDED = IGNORE_INDEX
"""``confused_as`` for the pixels a variant left undecided (label value 255)."""


@dataclass(frozen=True)
class ImageQuery:
    """What the QA page asks for.

    split: the images of this split without a problem. classes: only images whose image-level
    labels hold all of these class ids. variant / other: variant ids the sort is about; when set,
    only images both have a label map for are listed. class_id: the class the sort key is about
    (None: the whole image); for sort "confusion", the ground-truth class. sort: a key of
    ``SORTS``. descending: None takes ``DESCENDING``. flagged: one of ``FLAG_FILTERS`` ("any",
    "flagged", "unflagged" or a flag kind). confused_as: for sort "confusion" only, the class the
    variant labelled ``class_id``'s pixels as (another class id, or ``UNDECIDED`` = 255).
    """

    split: str
    classes: tuple[int, ...] = ()
    variant: str | None = None
    other: str | None = None
    class_id: int | None = None
    sort: str = "image"
    descending: bool | None = None
    flagged: str = "any"
    confused_as: int | None = None

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ValueError(f"unknown sort {self.sort!r}; expected one of {list(SORTS)}")
        if self.flagged not in FLAG_FILTERS:
            raise ValueError(f"unknown flag filter {self.flagged!r}; expected one of {list(FLAG_FILTERS)}")
        if self.sort != "image" and self.variant is None:
            raise ValueError(f"sort {self.sort!r} needs a variant")
        if self.sort in ("disagreement", "gain") and self.other is None:
            raise ValueError(f"sort {self.sort!r} needs a second variant")
        if self.sort != "confusion":
            if self.confused_as is not None:
                raise ValueError(f"confused_as is for sort 'confusion' only, not {self.sort!r}")
            return
        if self.class_id is None or not 0 <= self.class_id < IGNORE_INDEX:
            raise ValueError(f"sort 'confusion' needs a ground-truth class id (class_id 0..{IGNORE_INDEX - 1}), "
                             f"got {self.class_id!r}")
        if self.confused_as is None or not 0 <= self.confused_as <= IGNORE_INDEX:
            raise ValueError(f"sort 'confusion' needs the class the pixels were labelled as (confused_as: a "
                             f"class id or {IGNORE_INDEX} = undecided), got {self.confused_as!r}")
        if self.confused_as == self.class_id:
            raise ValueError(f"class {self.class_id} labelled as itself is a true positive, not a confusion; "
                             "sort by 'iou' for it")


@dataclass(frozen=True)
class ImagePage:
    """One page of ``find_images``: total = images matching the filters (all pages).

    rows: dicts with image_id, labels (foreground class ids), height, width, image_path, mask_path
    (as the ``images`` table holds them), value (the sort key:
    IoU or gain in [-1, 1], pixels for errors, conflicts and confusion, a fraction of the image's pixels for
    disagreement (a lower bound, see ``_key_sql``); None for "image") and flags (the image's flag kinds, sorted).
    """

    total: int
    rows: list[dict[str, Any]]


def _iou_per_image(variant: str, where: str = "") -> str:
    """Per image of ``variant`` (an SQL parameter): the IoU of the class ``where`` selects, or the
    mean over the classes in the ground truth or the prediction (those are the rows ``counts``
    keeps) for the whole image."""
    return f"""SELECT image_id, avg(tp / (tp + fp + fn)) AS value FROM counts
               WHERE variant_id = {variant} {where} GROUP BY image_id"""


def _key_sql(query: ImageQuery) -> str | None:
    """The sort key as ``SELECT image_id, value``; None for the image id order."""
    by_class = query.class_id is not None
    class_filter = "AND class_id = $class_id" if by_class else ""
    if query.sort == "iou":
        return _iou_per_image("$variant", class_filter)
    if query.sort == "errors":
        # Without a class: every wrong pixel is one FN of its true class (an undecided 255 too).
        return f"""SELECT image_id, sum({'fp + fn' if by_class else 'fn'}) AS value FROM counts
                   WHERE variant_id = $variant {class_filter} GROUP BY image_id"""
    if query.sort == "conflicts":
        pair = "AND (winner = $class_id OR loser = $class_id)" if by_class else ""
        return f"""SELECT image_id, sum(pixels) AS value FROM conflicts
                   WHERE variant_id = $variant {pair} GROUP BY image_id"""
    if query.sort == "confusion":  # one stored cell per image at most (its primary key)
        return """SELECT image_id, pixels AS value FROM confusion
                  WHERE variant_id = $variant AND gt = $class_id AND pred = $confused_as"""
    if query.sort == "disagreement":
        # Where the ground truth is c, the pixels exactly one variant calls c number at least
        # |TP_a - TP_b|; elsewhere at least |FP_a - FP_b|. A pixel the two label differently is
        # counted for both its classes, hence the half: a lower bound on the pixels labelled
        # differently that sees a moved object (same area, other place), unlike areas alone.
        per_class = "abs(coalesce(a.tp, 0) - coalesce(b.tp, 0)) + abs(coalesce(a.fp, 0) - coalesce(b.fp, 0))"
        total = f"sum({per_class})" if by_class else f"sum({per_class}) / 2"
        rows = "SELECT image_id, class_id, tp, fp FROM counts WHERE variant_id = {} " + class_filter
        return f"""SELECT image_id, {total} AS value
                   FROM ({rows.format('$variant')}) a FULL JOIN ({rows.format('$other')}) b
                        USING (image_id, class_id)
                   GROUP BY image_id"""
    if query.sort == "gain":
        # With a class: images whose ground truth holds it, where both IoUs are defined.
        where = f"{class_filter} AND tp + fn > 0" if by_class else ""
        return f"""SELECT image_id, b.value - a.value AS value
                   FROM ({_iou_per_image('$variant', where)}) a JOIN ({_iou_per_image('$other', where)}) b
                        USING (image_id)"""
    return None


def find_images(con: Con, dataset_id: str, query: ImageQuery, limit: int = 24, offset: int = 0) -> ImagePage:
    """One page of the images ``query`` asks for, in its order (ties and NULLs: image id).

    One SQL statement. With a sort key, images the key does not cover are left out: for a class,
    images where neither the ground truth nor the variant has it (iou, errors), or, for
    conflicts, images without a conflict; for confusion, images without a pixel of that cell
    (none of the class labelled so, or recorded before schema 8: a variant without confusion
    rows lists nothing). Raises ``ValueError`` for a bad query.
    """
    params: dict[str, Any] = {"dataset": dataset_id, "split": query.split,
                              "classes": list(query.classes), "limit": limit, "offset": offset}
    where = ["i.dataset_id = $dataset", "i.split = $split", "i.problem IS NULL",
             "list_has_all(i.labels, $classes::UTINYINT[])"]
    for name in ("variant", "other"):
        if getattr(query, name) is not None:
            params[name] = getattr(query, name)
            where.append(f"EXISTS (SELECT 1 FROM label_maps m WHERE m.variant_id = ${name} AND m.image_id = i.image_id)")
    flag_exists = "EXISTS (SELECT 1 FROM flags f WHERE f.dataset_id = $dataset AND f.image_id = i.image_id{})"
    if query.flagged == "flagged":
        where.append(flag_exists.format(""))
    elif query.flagged == "unflagged":
        where.append("NOT " + flag_exists.format(""))
    elif query.flagged != "any":
        params["kind"] = query.flagged
        where.append(flag_exists.format(" AND f.kind = $kind"))
    key = _key_sql(query)
    if key is not None and query.class_id is not None:
        params["class_id"] = query.class_id
    if query.confused_as is not None:
        params["confused_as"] = query.confused_as
    descending = DESCENDING[query.sort] if query.descending is None else query.descending
    value = "NULL" if key is None else "k.value / (b.height * b.width)" if query.sort == "disagreement" else "k.value"
    body = f"""
        WITH base AS (SELECT i.image_id, i.labels, i.height, i.width, i.image_path, i.mask_path FROM images i WHERE {' AND '.join(where)})
        SELECT {{columns}} FROM base b {f'JOIN ({key}) k USING (image_id)' if key else ''}"""
    columns = f"""b.image_id, b.labels::INTEGER[] AS labels, b.height, b.width, b.image_path, b.mask_path,
                  {value}::DOUBLE AS value,
                  count(*) OVER () AS total,
                  coalesce((SELECT list(f.kind ORDER BY f.kind) FROM flags f
                            WHERE f.dataset_id = $dataset AND f.image_id = b.image_id), []) AS flags"""
    order = f"value {'DESC' if descending else 'ASC'} NULLS LAST, " if key else ""
    rows = _dicts(con.execute(f"{body.format(columns=columns)} ORDER BY {order}b.image_id LIMIT $limit OFFSET $offset",
                              params))
    if rows:
        total = rows[0]["total"]
    else:  # an offset past the end: the total still matters to the pager
        del params["limit"], params["offset"]
        total = con.execute(body.format(columns="count(*)"), params).fetchone()[0]
    for row in rows:
        del row["total"]
    return ImagePage(total=int(total), rows=rows)


def image_row(con: Con, dataset_id: str, split: str, image_id: str) -> dict[str, Any] | None:
    """The ``images`` row of one image of a split (None when it is not listed there)."""
    rows = _dicts(con.execute("SELECT * FROM images WHERE dataset_id = ? AND split = ? AND image_id = ?",
                              [dataset_id, split, image_id]))
    return rows[0] if rows else None


def image_label_maps(con: Con, dataset_id: str, image_id: str) -> dict[str, tuple[str, str | None]]:
    """``{variant_id: (label path, scores path or None)}`` of every variant of the dataset that
    labelled the image; paths relative to the cache dir."""
    rows = con.execute(
        """SELECT m.variant_id, m.path, m.scores_path FROM label_maps m
           JOIN variants v ON v.id = m.variant_id AND v.dataset_id = ? WHERE m.image_id = ?""",
        [dataset_id, image_id]).fetchall()
    return {variant_id: (path, scores) for variant_id, path, scores in rows}


# --- flags -----------------------------------------------------------------------------------


def set_flag(con: Con, dataset_id: str, image_id: str, kind: str, note: str = "",
             variant_id: str | None = None, created_by: str | None = None) -> None:
    """Flag an image (replacing its flag of the same kind); ``created_by``: the signed-in user
    (team mode), else None. Raises ``ValueError`` for an unknown kind, and ``KeyError`` for an
    image the dataset does not list."""
    if kind not in FLAG_KINDS:
        raise ValueError(f"unknown flag kind {kind!r}; expected one of {list(FLAG_KINDS)}")
    if con.execute("SELECT count(*) FROM images WHERE dataset_id = ? AND image_id = ?",
                   [dataset_id, image_id]).fetchone()[0] == 0:
        raise KeyError(f"image {image_id!r} is not in dataset {dataset_id}")
    con.execute("INSERT OR REPLACE INTO flags (dataset_id, image_id, kind, note, variant_id, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", [dataset_id, image_id, kind, note, variant_id, time.time(), created_by])


def remove_flag(con: Con, dataset_id: str, image_id: str, kind: str) -> None:
    con.execute("DELETE FROM flags WHERE dataset_id = ? AND image_id = ? AND kind = ?", [dataset_id, image_id, kind])


def flags(con: Con, dataset_id: str, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every flag of the dataset (of ``kinds`` when given), newest first, with the flagged
    variant's name, who flagged it (team mode) and the splits listing the image."""
    kind_filter = "AND f.kind IN (SELECT unnest(?::VARCHAR[]))" if kinds is not None else ""
    return _dicts(con.execute(
        f"""SELECT f.image_id, f.kind, f.note, f.variant_id, v.name AS variant_name, f.created_at, f.created_by,
                   (SELECT list(DISTINCT i.split ORDER BY i.split) FROM images i
                    WHERE i.dataset_id = f.dataset_id AND i.image_id = f.image_id) AS splits
            FROM flags f LEFT JOIN variants v ON v.id = f.variant_id
            WHERE f.dataset_id = ? {kind_filter} ORDER BY f.created_at DESC, f.image_id, f.kind""",
        [dataset_id, *([list(kinds)] if kinds is not None else [])]))


def flagged_ids(con: Con, dataset_id: str, kinds: Sequence[str] | None = None) -> list[str]:
    """The ids of the images with a flag (of one of ``kinds`` when given), sorted."""
    return sorted({row["image_id"] for row in flags(con, dataset_id, kinds)})
