"""Pseudo-label QA: find the images that matter, see why with overlays, flag them.

The grid is one ``cache.qa.find_images`` query over the cached counts (no label map decoded) and
thumbnails from ``cache.thumbnails``; the single-image view decodes that one image's files. The
per-class IoU heatmap links here with ``?split=&variant=&class=&sort=`` (a cell's images, worst
first), a confusion-matrix cell with ``?sort=confusion&variant=&class=<ground truth>&as=<class or
"undecided">`` (the images with most pixels of the one labelled as the other); ``?image=`` opens
one image. Flags are written to the cache at once and can keep images out of the ISLE selection
subset (ISLE ensemble page, or ``python -m engine isle --exclude-flagged``).
Class names, pickers and overlay colours are the picked dataset's class set; a link may name the
dataset (``?dataset=<id>``), and switching datasets resets the class filters and closes the image.

Widget keys start with "qa_"; "qa_image" (not a widget) is the image open in the single view.
"""

from __future__ import annotations

import csv
import io
import math

import streamlit as st

from cache import qa, queries, reports
from cache.db import connect
from cache.labelmaps import LabelMapError
from cache.thumbnails import ThumbnailError
from engine.core.types import ImageError
from ui.auth import current_user
from ui.charts import row_labels
from ui.common import cache_dir, pick_dataset_and_split, read, refresh
from ui.qa_view import (
    GT,
    NONE,
    class_scores,
    comparison,
    grid_thumbnail,
    legend_table,
    open_image,
    pictures,
    score_picture,
)

COLUMNS = 4
PAGE_SIZES = (12, 24, 48)
UNDECIDED_NAME = "undecided"  # "as" of a link for the pixels a variant labelled 255
state = st.session_state

st.title("Pseudo-label QA")
st.caption("Sort and filter the images by what the cached counts say, open one to see why: overlays of "
           "the ground truth and the variants, a comparison slider, the stored class scores, and flags.")


def _apply_query_params() -> None:
    """Copy a link's ``?dataset=&split=&variant=&other=&class=&as=&sort=&descending=0|1&image=``
    into the widgets, once per link; the dataset, the class and "as" (names of its class set, "as"
    also "undecided") are applied once the dataset is picked."""
    incoming = {key: st.query_params[key] for key in st.query_params}
    if not incoming or state.get("qa_link") == incoming:
        return
    state["qa_link"] = incoming
    if incoming.get("split"):  # a split the dataset lacks falls back to the picker's default
        state["split"] = incoming["split"]
    for key in ("variant", "other"):
        if key in incoming:
            state[f"qa_{key}"] = incoming[key]
    state["qa_link_dataset"] = incoming.get("dataset")
    state["qa_link_class"] = incoming.get("class")
    state["qa_link_as"] = incoming.get("as")
    if incoming.get("sort") in qa.SORTS:
        state["qa_sort"] = incoming["sort"]
        state["qa_descending"] = (incoming["descending"] == "1" if incoming.get("descending") in ("0", "1")
                                  else qa.DESCENDING[incoming["sort"]])
    state["qa_image"] = incoming.get("image")
    state["qa_page"] = 1


def _switched_dataset(linked: bool) -> None:
    """Another dataset than the last run's: its label values name other classes, its images
    other ids, so the class filters are reset and the open image is closed (unless a link of
    this run opened it: linked)."""
    for key in ("qa_class", "qa_confused_as", "qa_classes", "qa_scores_class", "qa_layer_a", "qa_layer_b"):
        state.pop(key, None)
    state["qa_page"] = 1
    if not linked:
        state["qa_image"] = None
        st.query_params.pop("image", None)


_apply_query_params()
linked = "qa_link_dataset" in state  # a link was applied in this run
dataset, split = pick_dataset_and_split("Nothing to check yet: queue CAM on the Home page.",
                                        select=state.pop("qa_link_dataset", None))
if state.get("qa_dataset") not in (None, dataset.id):
    _switched_dataset(linked)
state["qa_dataset"] = dataset.id
classes = dataset.classes
if (class_name := state.pop("qa_link_class", None)) in classes.names:
    state["qa_class"] = classes.index(class_name)
if (as_name := state.pop("qa_link_as", None)) == UNDECIDED_NAME:
    state["qa_confused_as"] = qa.UNDECIDED
elif as_name in classes.names:
    state["qa_confused_as"] = classes.index(as_name)
directory = cache_dir()
table = read(reports.iou_table, dataset.id, split)
names = dict(zip(table.variant_ids, row_labels(table)))
layer_names = {GT: "ground truth", NONE: "none", **names}


def _label_name(class_id: int) -> str:
    return "undecided (255)" if class_id == qa.UNDECIDED else classes.name(class_id)


def _fmt(query: qa.ImageQuery, value: float | None) -> str:
    sort = query.sort
    if value is None:
        return ""
    if sort == "confusion":
        return f"{int(value):,} px {classes.name(query.class_id)} → {_label_name(query.confused_as)}"
    if sort == "iou":
        return f"IoU {100 * value:.1f}%"
    if sort == "gain":
        return f"gain {100 * value:+.1f}".replace("-", "\u2212") + " pts"
    if sort == "disagreement":
        return f"differ ≥ {100 * value:.1f}% px"
    return f"{int(value):,} px"


def _class_names(labels) -> str:
    return ", ".join(classes.name(c) for c in labels)


def _flag_text(kinds: list[str]) -> str:
    return "  ⚑ " + ", ".join(qa.FLAG_KINDS[k] for k in kinds) if kinds else ""


# --- filters and sort (always drawn, so their state survives the single-image view) ----------


def _first_page() -> None:
    state["qa_page"] = 1


st.subheader("Find images")
left, middle, right = st.columns(3)
sort = left.selectbox("Sort by", list(qa.SORTS), format_func=qa.SORTS.get, key="qa_sort",
                      on_change=lambda: state.update(qa_descending=qa.DESCENDING[state["qa_sort"]], qa_page=1))
needs_variant = sort != "image"
if state.get("qa_variant") not in names:
    state.pop("qa_variant", None)
variant = middle.selectbox("Variant", list(names), format_func=names.get, key="qa_variant", on_change=_first_page,
                           index=None, placeholder="choose a variant") if names else None
other = None
if sort in ("disagreement", "gain"):
    others = [v for v in names if v != variant]
    if state.get("qa_other") not in others:
        state.pop("qa_other", None)
    other = right.selectbox("Second variant", others, format_func=names.get, key="qa_other", index=None,
                            placeholder="choose the variant to compare with", on_change=_first_page)
class_id = right.selectbox("Class the sort is about", [None, *range(classes.num_classes)], key="qa_class",
                           format_func=lambda c: "whole image" if c is None else classes.name(c), on_change=_first_page,
                           help="For a confusion: the ground-truth class.")
confused_as = None
if sort == "confusion":
    labelled = [c for c in (*range(classes.num_classes), qa.UNDECIDED) if c != class_id]
    if state.get("qa_confused_as") not in labelled:
        state.pop("qa_confused_as", None)
    confused_as = right.selectbox("Labelled as", labelled, format_func=_label_name, key="qa_confused_as",
                                  index=None, placeholder="choose what the variant labelled it as",
                                  on_change=_first_page)
left, middle, right = st.columns(3)
holding = left.multiselect("Images holding the classes", classes.foreground, format_func=classes.name,
                           key="qa_classes", on_change=_first_page)
flagged = middle.selectbox("Flags", qa.FLAG_FILTERS, key="qa_flagged", on_change=_first_page,
                           format_func=lambda f: qa.FLAG_KINDS.get(f, f))
state.setdefault("qa_descending", qa.DESCENDING[sort])
descending = right.toggle("Largest first", key="qa_descending", on_change=_first_page,
                          help="Default per sort: lowest IoU first; most errors, disagreement, gain, conflicts and "
                               "confused pixels first.")
grid_layer = right.selectbox("Grid overlay", [GT, NONE, *names], format_func=layer_names.get,
                             index=0 if variant is None else 2 + list(names).index(variant), key="qa_grid_layer")

query = None
if needs_variant and variant is None:
    st.info(f"Choose a variant to sort by {qa.SORTS[sort].lower()}.")
elif sort in ("disagreement", "gain") and other is None:
    st.info("Choose the second variant.")
elif sort == "confusion" and (class_id is None or confused_as is None):
    st.info("Choose the ground-truth class and what the variant labelled it as.")
else:
    query = qa.ImageQuery(split, tuple(holding), variant, other, class_id, sort, descending, flagged, confused_as)
    if sort == "confusion" and variant not in read(queries.confused_variants, dataset.id):
        st.warning(f"{names[variant]} has no class confusion recorded (labelled before the cache recorded it): "
                   f"count its label maps again with `python -m engine recount {variant}` to sort by a confusion.")

left, right = st.columns([1, 3])
page_size = left.selectbox("Images per page", PAGE_SIZES, index=1, key="qa_page_size", on_change=_first_page)
page = None
if query is not None:
    total = read(qa.find_images, dataset.id, query, 1, 0).total
    pages = max(1, math.ceil(total / page_size))
    state["qa_page"] = min(max(int(state.get("qa_page", 1)), 1), pages)
    number = right.number_input(f"Page (of {pages}; {total:,} image(s))", 1, pages, key="qa_page")
    page = read(qa.find_images, dataset.id, query, page_size, (number - 1) * page_size)


# --- grid --------------------------------------------------------------------------------------


def _thumb(row: dict, layer: str, opacity: float):
    stored = read(queries.label_map_rows, layer).get(row["image_id"]) if layer not in (GT, NONE) else None
    return grid_thumbnail(directory, row["image_path"], row["mask_path"], directory / stored[0] if stored else None,
                          layer, opacity, classes)


def _open(image_id: str) -> None:
    state["qa_image"] = image_id
    st.query_params["image"] = image_id
    state["qa_link"] = {key: st.query_params[key] for key in st.query_params}


def grid() -> None:
    if page is None:
        return
    if not page.rows:
        st.info("No image matches these filters.")
        return
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.55, 0.05, key="qa_grid_opacity")
    for start in range(0, len(page.rows), COLUMNS):
        for column, row in zip(st.columns(COLUMNS), page.rows[start:start + COLUMNS]):
            with column:
                try:
                    st.image(_thumb(row, grid_layer, opacity))
                except ThumbnailError as exc:
                    st.error(str(exc))
                st.caption(f"**{row['image_id']}** {_fmt(query, row['value'])}"
                           f" · {_class_names(row['labels'])}{_flag_text(row['flags'])}")
                st.button("Open", key=f"qa_open_{row['image_id']}", on_click=_open, args=(row["image_id"],))


# --- single image ------------------------------------------------------------------------------


def _close() -> None:
    state["qa_image"] = None
    st.query_params.pop("image", None)
    state["qa_link"] = {key: st.query_params[key] for key in st.query_params}


def _save_flag(image_id: str, variant_id: str | None) -> None:
    with connect(directory) as con:
        qa.set_flag(con, dataset.id, image_id, state["qa_flag_kind"], state.get("qa_flag_note", ""), variant_id,
                    current_user())
    state["qa_flag_note"] = ""
    refresh()


def _remove_flag(image_id: str, kind: str) -> None:
    with connect(directory) as con:
        qa.remove_flag(con, dataset.id, image_id, kind)
    refresh()


def single(image_id: str) -> None:
    row = read(qa.image_row, dataset.id, split, image_id)
    if row is None or row["problem"]:
        st.error(f"Image {image_id!r} is not a usable image of {split}"
                 + (f": {row['problem']}" if row else "."))
        st.button("← Back to the grid", on_click=_close, key="qa_back")
        return
    maps = {v: paths for v, paths in read(qa.image_label_maps, dataset.id, image_id).items() if v in names}
    ids = [r["image_id"] for r in page.rows] if page else []
    here = ids.index(image_id) if image_id in ids else None
    nav = st.columns([2, 1, 1, 4])
    nav[0].button("← Back to the grid", on_click=_close, key="qa_back")
    if here is not None:
        nav[1].button("◀ Previous", on_click=_open, args=(ids[here - 1],), disabled=here == 0, key="qa_prev")
        nav[2].button("Next ▶", on_click=_open, args=(ids[min(here + 1, len(ids) - 1)],),
                      disabled=here == len(ids) - 1, key="qa_next")
    flags = [f for f in read(qa.flags, dataset.id) if f["image_id"] == image_id]
    st.markdown(f"### {image_id}")
    st.caption(f"{row['width']}×{row['height']} px · classes: "
               f"{_class_names(row['labels']) or 'none'}{_flag_text([f['kind'] for f in flags])}"
               + ("" if row["mask_path"] else " · no ground truth"))
    layers = [*([GT] if row["mask_path"] else []), *maps]
    if not layers:
        st.info("This image has no ground truth and no label map yet: nothing to overlay.")
        st.image(grid_thumbnail(directory, row["image_path"], None, None, NONE, 0.0, classes))
        return
    left, middle, right = st.columns(3)
    default_a = layers.index(variant) if variant in maps else 0
    a = left.selectbox("Layer A", layers, index=default_a, format_func=layer_names.get, key="qa_layer_a")
    b_options = [NONE, *[layer for layer in layers if layer != a]]
    b = middle.selectbox("Layer B", b_options, format_func=layer_names.get, key="qa_layer_b",
                         index=b_options.index(other) if other in b_options
                         else (1 if a != GT and len(b_options) > 1 else 0))
    mode = right.radio("Show", ["side by side", "comparison slider"], horizontal=True, key="qa_mode",
                       disabled=b == NONE)
    opacity = left.slider("Overlay opacity", 0.0, 1.0, 0.6, 0.05, key="qa_opacity")
    try:
        view = open_image(directory, row["image_path"], row["mask_path"], maps, a, b)
    except (ImageError, LabelMapError) as exc:
        st.error(str(exc))
        return
    shown = [layer for layer in (a, b) if layer != NONE]
    if mode == "comparison slider" and len(shown) == 2:
        position = middle.slider("Slider position (A left, B right)", 0.0, 1.0, 0.5, 0.01, key="qa_wipe")
        st.image(comparison(view, opacity, position, classes),
                 caption=f"left: {layer_names[a]} · right: {layer_names[b]}")
    else:
        for column, layer, picture in zip(st.columns(len(shown)), shown, pictures(view, opacity, classes)):
            column.image(picture, caption=layer_names[layer])

    st.markdown("**Classes in this image**")
    # The colour cell painted in the class's palette colour: the legend of the overlays above.
    st.dataframe(legend_table(view, layer_names, a, b, classes), hide_index=True)
    st.caption("Pixels per class (ground-truth pixels labelled 255 ignored); IoU in % in this image."
               if view.gt is not None else "Pixels per class; no IoU: this image has no ground truth.")

    with_scores = [v for v, (_, scores) in maps.items() if scores]
    if with_scores:
        with st.expander("Class scores (CAM) as a heatmap"):
            source = st.selectbox("Scores of", with_scores, format_func=names.get, key="qa_scores_variant",
                                  index=with_scores.index(a) if a in with_scores else 0)
            try:
                stored, scores = class_scores(directory, maps[source][1])
            except LabelMapError as exc:
                st.error(str(exc))
            else:
                pick = st.selectbox("Class", range(len(stored)), format_func=lambda k: classes.name(stored[k]),
                                    index=len(stored) - 1, key="qa_scores_class")
                st.image(score_picture(view, scores[pick], opacity),
                         caption=f"{classes.name(stored[pick])} score of {names[source]} "
                                 f"(stored at {scores.shape[2]}×{scores.shape[1]}, upsampled)")

    st.markdown("**Flag this image**")
    for flag in flags:
        text, button = st.columns([5, 1])
        text.write(f"⚑ {qa.FLAG_KINDS[flag['kind']]}: {flag['note'] or '(no note)'}"
                   + (f" — on {flag['variant_name']}" if flag["variant_name"] else ""))
        button.button("Remove", key=f"qa_unflag_{flag['kind']}", on_click=_remove_flag, args=(image_id, flag["kind"]))
    kind_col, note_col, button_col = st.columns([2, 4, 1])
    kind_col.selectbox("Kind", list(qa.FLAG_KINDS), format_func=qa.FLAG_KINDS.get, key="qa_flag_kind")
    note_col.text_input("Note", key="qa_flag_note", placeholder="what is wrong, what to look at")
    button_col.button("Flag", key="qa_flag", on_click=_save_flag,
                      args=(image_id, a if a not in (GT, NONE) else None), type="primary")


# --- flags -------------------------------------------------------------------------------------


def flag_list() -> None:
    rows = read(qa.flags, dataset.id)
    st.subheader(f"Flags ({len(rows)})")
    if not rows:
        st.caption("No flag yet: open an image and flag it.")
        return
    kinds = st.multiselect("Kinds", list(qa.FLAG_KINDS), default=list(qa.FLAG_KINDS),
                           format_func=qa.FLAG_KINDS.get, key="qa_flag_kinds")
    rows = [r for r in rows if r["kind"] in kinds]
    table_rows = [{"image": r["image_id"], "kind": qa.FLAG_KINDS[r["kind"]], "note": r["note"],
                   "variant": r["variant_name"], "by": r["created_by"] or "—",
                   "splits": ", ".join(r["splits"] or [])} for r in rows]
    st.dataframe(table_rows, hide_index=True)
    ids = sorted({r["image_id"] for r in rows})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["image", "kind", "note", "variant", "by", "splits"])
    writer.writeheader()
    writer.writerows(table_rows)
    left, right = st.columns(2)
    left.download_button("Image list (.txt)", "".join(f"{i}\n" for i in ids), "flagged.txt", key="qa_flags_txt",
                         help="One id per line, like ImageSets/Segmentation/<split>.txt")
    right.download_button("Flags (.csv)", text.getvalue(), "flags.csv", key="qa_flags_csv")
    st.caption("Keep flagged images out of the ISLE selection subset on the ISLE ensemble page "
               "(\"Exclude flagged images\") or with `python -m engine isle --exclude-flagged KIND`.")


if state.get("qa_image"):
    single(state["qa_image"])
else:
    grid()
flag_list()
