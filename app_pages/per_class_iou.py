"""Per-class IoU: every variant against the ground truth, class by class, over a split; refine a
variant from here and watch its row appear."""

from __future__ import annotations

import streamlit as st

from cache import queries, reports
from cache.reports import gain_table, tree_order
from cache.voc import VOC_CLASSES
from ui.charts import column_labels, gain_heatmap, iou_heatmap, row_labels
from ui.common import has_active_jobs, jobs_panel, pick_dataset_and_split, queue_chain, read, refinement_steps

VIEWS = {"flat": "flat", "grouped": "grouped by source", "gain": "gain vs source"}

st.title("Per-class IoU")
st.caption("IoU = TP / (TP + FP + FN) summed over the split's images, ground-truth pixels labelled "
           "255 ignored. mIoU averages the classes that have at least one image in the split. "
           "Computed from cached per-image counts; no label map is decoded.")

dataset, split = pick_dataset_and_split("Nothing to show yet: queue CAM and CAM → dCRF on the Home page.")


def heatmap() -> None:
    """The heatmap in the chosen view and its numbers, re-read from the cache on every run."""
    table = read(reports.iou_table, dataset.id, split)
    class_images = read(queries.class_image_counts, dataset.id, split)
    if not table.names:
        st.info(f"No variant has label maps on {split} yet.")
        return
    empty = [name for c, name in enumerate(VOC_CLASSES) if not class_images.get(c)]
    if empty:
        st.warning(f"No image of {', '.join(empty)} in {split}: those columns are empty, not 0, "
                   "and left out of the mIoU.")
    view = st.radio("Rows", list(VIEWS), format_func=VIEWS.get, horizontal=True, key="view")
    gain = gain_table(table) if view == "gain" else None
    if gain is None:
        st.caption("Click a cell to open its images in Pseudo-label QA, most error pixels first.")
        event = st.plotly_chart(iou_heatmap(table, class_images, view), key="heatmap", on_select="rerun",
                                selection_mode="points")
        rows = tree_order(table)[0] if view == "grouped" else list(range(len(table.names)))
        cells = [(table.variant_ids[r], None) for r in rows]
    elif gain.rows.size:
        st.caption("IoU of each refined variant minus its source's, in points, class by class. Click a cell "
                   "to open the images where the refinement lost most on that class.")
        event = st.plotly_chart(gain_heatmap(table, gain, class_images), key="heatmap", on_select="rerun",
                                selection_mode="points")
        cells = [(table.variant_ids[s], table.variant_ids[r]) for r, s in zip(gain.rows, gain.sources)]
    else:
        st.info(f"No refined variant has label maps on {split} next to its source.")
        return
    points = event.selection.points if event else []
    if points:
        row, column = divmod(points[0]["point_index"], len(VOC_CLASSES) + 1)
        variant, other = cells[row]
        link = {"split": split, "variant": variant, "sort": "errors" if other is None else "gain"}
        if other is not None:
            link |= {"other": other, "descending": "0"}
        if column < len(VOC_CLASSES):  # the mIoU column sorts by the whole image
            link |= {"class": VOC_CLASSES[column]}
        st.switch_page("app_pages/qa.py", query_params=link)
    with st.expander("The numbers"):
        columns = column_labels(class_images)
        st.dataframe(
            [{"variant": label, "label maps": int(n),
              **{col: (None if iou != iou else round(100 * iou, 2)) for col, iou in zip(columns, [*row, miou])}}
             for label, n, row, miou in zip(row_labels(table), table.labelled, table.iou, table.miou)],
            hide_index=True,
        )


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
