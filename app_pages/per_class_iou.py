"""Per-class IoU: every variant against the ground truth, class by class, over a split; refine a
variant from here and watch its row appear.

The columns are the classes of the picked dataset (its ``ClassSet``), after a frozen mIoU
column: sort them by IoU (of one row or the mean) or by images, hide the classes without images,
zoom into the chart. A click on a cell opens its images in Pseudo-label QA.
"""

from __future__ import annotations

import streamlit as st

from cache import queries, reports
from cache.reports import gain_table, tree_order
from ui.charts import (
    COLUMN_SORTS,
    cell_link,
    column_order,
    empty_classes,
    gain_heatmap,
    iou_heatmap,
    iou_numbers,
    row_labels,
    truth_note,
)
from ui.common import has_active_jobs, jobs_panel, pick_dataset_and_split, queue_chain, read, refinement_steps

VIEWS = {"flat": "flat", "grouped": "grouped by source", "gain": "gain vs source"}
MEAN = "__mean__"  # the "IoU of" choice that sorts by the mean over the rows
NAMED_EMPTY = 12  # at most this many empty classes are named in the note

st.title("Per-class IoU")
st.caption("IoU = TP / (TP + FP + FN) summed over the split's images, ground-truth pixels labelled "
           "255 ignored. mIoU averages the classes that have at least one image in the split. "
           "Computed from cached per-image counts; no label map is decoded.")

dataset, split = pick_dataset_and_split("Nothing to show yet: queue CAM and CAM → dCRF on the Home page.")


def _empty_note(names: list[str], hidden: bool) -> str:
    more = len(names) - NAMED_EMPTY
    shown = ", ".join(names[:NAMED_EMPTY]) + (f" and {more} more" if more > 0 else "")
    where = ("hidden (switch off “Hide classes without images” to see their empty columns)" if hidden
             else "those columns are empty, not 0")
    return f"No image of {shown} in {split}: {where}; left out of the mIoU."


def heatmap() -> None:
    """The heatmap in the chosen view and its numbers, re-read from the cache on every run."""
    table = read(reports.iou_table, dataset.id, split)
    class_images = read(queries.class_image_counts, dataset.id, split)
    if not table.names:
        st.info(f"No variant has label maps on {split} yet.")
        return
    note = truth_note(table)
    if not table.with_truth.any():
        st.info(note)  # no IoU number: none can be computed
        return
    view = st.radio("Rows", list(VIEWS), format_func=VIEWS.get, horizontal=True, key="view")
    gain = gain_table(table) if view == "gain" else None
    if gain is not None and not gain.rows.size:
        st.info(f"No refined variant has label maps on {split} next to its source.")
        return

    # Columns: sort, the row the IoU sorts by, hide the empty ones.
    rows = (list(range(len(table.names))) if view == "flat" else tree_order(table)[0]) if gain is None \
        else [int(r) for r in gain.rows]
    labels = row_labels(table)
    by_options = {MEAN: "mean of the rows", **{table.variant_ids[r]: labels[r] for r in rows}}
    if st.session_state.get("heatmap_by") not in by_options:
        st.session_state.pop("heatmap_by", None)
    left, middle, right = st.columns([2, 3, 2], vertical_alignment="bottom")
    sort = left.selectbox("Columns by", list(COLUMN_SORTS), format_func=COLUMN_SORTS.get, key="heatmap_sort")
    by = middle.selectbox("IoU of" if gain is None else "Gain of", list(by_options), format_func=by_options.get,
                          key="heatmap_by", disabled=sort not in ("iou_low", "iou_high"))
    hide = right.toggle("Hide classes without images", value=True, key="heatmap_hide_empty")
    columns = column_order(table, class_images, sort, None if by == MEAN else by, hide, gain)

    empty = [dataset.classes.name(c) for c in empty_classes(dataset.classes, class_images)]
    if empty:
        st.caption(_empty_note(empty, hide))
    if note:
        st.caption(note)
    if not columns:
        st.info(f"No image of {split} holds a class.")
        return
    st.caption("mIoU stays the first column. Drag a box to zoom in, double-click to zoom out; click a cell "
               + ("to open its images in Pseudo-label QA, most error pixels first." if gain is None else
                  "to open the images where the refinement lost most on that class."))
    if gain is None:
        figure = iou_heatmap(table, class_images, view, columns)
        cells = [(table.variant_ids[r], None) for r in rows]
    else:
        figure = gain_heatmap(table, gain, class_images, columns)
        cells = [(table.variant_ids[s], table.variant_ids[r]) for r, s in zip(gain.rows, gain.sources)]
    event = st.plotly_chart(figure, key="heatmap", on_select="rerun", selection_mode="points")
    points = event.selection.points if event else []
    if points:
        st.switch_page("app_pages/qa.py",
                       query_params=cell_link(points[0], columns, cells, dataset.classes, dataset.id, split))
    with st.expander("The numbers"):
        st.dataframe(iou_numbers(table, class_images, columns), hide_index=True)


# Filled after the form below, so that a chain queued by this very run already makes it live.
heatmap_slot = st.container()

st.subheader("Refine a variant")
table = read(reports.iou_table, dataset.id, split)
if not table.names:
    st.caption(f"No variant to refine on {split} yet.")
else:
    sources = dict(zip(table.variant_ids, row_labels(table)))
    source = st.selectbox("Variant", list(sources), format_func=sources.get, key="iou_refine_source")
    steps = refinement_steps("iou_refine_chain")
    if st.button("Queue", key="iou_queue_refine", disabled=not steps):
        queue_chain(dataset.root, split, steps, source, f"every variant of the chain is complete on {split}")

st.subheader("Jobs")
jobs_panel()

with heatmap_slot:
    # New rows appear by themselves while this dataset has work queued or running; the reads are
    # cached on the cache fingerprint, so a rerun with nothing new costs no query.
    st.fragment(run_every=3 if has_active_jobs(dataset.id) else None)(heatmap)()
