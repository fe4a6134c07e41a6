"""Per-class IoU: every variant against the ground truth, class by class, over a split."""

from __future__ import annotations

import streamlit as st

from cache.voc import VOC_CLASSES
from pages.charts import column_labels, iou_heatmap, row_labels
from pages.common import cache_exists, pick_dataset, pick_split, read

st.title("Per-class IoU")
st.caption("IoU = TP / (TP + FP + FN) summed over the split's images, ground-truth pixels labelled "
           "255 ignored. mIoU averages the classes that have at least one image in the split. "
           "Computed from cached per-image counts; no label map is decoded.")

dataset = pick_dataset() if cache_exists() else None
split = pick_split(dataset["id"]) if dataset else None
if split is None:
    st.info("Nothing to show yet: queue CAM and CAM → dCRF on the Home page.")
    st.stop()

table = read("iou_table", dataset["id"], split)
class_images = read("class_image_counts", dataset["id"], split)
if not table.names:
    st.info(f"No variant has label maps on {split} yet.")
    st.stop()

empty = [name for c, name in enumerate(VOC_CLASSES) if not class_images.get(c)]
if empty:
    st.warning(f"No image of {', '.join(empty)} in {split}: those columns are empty, not 0, "
               "and left out of the mIoU.")
st.plotly_chart(iou_heatmap(table, class_images), key="heatmap")

with st.expander("The numbers"):
    columns = column_labels(class_images)
    st.dataframe(
        [{"variant": label, "label maps": int(n),
          **{col: (None if iou != iou else round(100 * iou, 2)) for col, iou in zip(columns, [*row, miou])}}
         for label, n, row, miou in zip(row_labels(table), table.labelled, table.iou, table.miou)],
        hide_index=True,
    )
