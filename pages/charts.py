"""Plotly figures of the pages (presentation only; the numbers come from ``cache.reports``)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from cache.reports import IoUTable
from cache.voc import VOC_CLASSES


def row_labels(table: IoUTable) -> list[str]:
    """Variant names, with the id added where two variants share a name (different parameters)."""
    seen = {name: table.names.count(name) for name in table.names}
    return [f"{name} [{vid}]" if seen[name] > 1 else name for name, vid in zip(table.names, table.variant_ids)]


def column_labels(class_images: dict[int, int]) -> list[str]:
    labels = []
    for class_id, name in enumerate(VOC_CLASSES):
        n = class_images.get(class_id, 0)
        labels.append(f"{name} ({n})" if n else f"{name} (no images)")
    return labels + ["mIoU"]


def iou_heatmap(table: IoUTable, class_images: dict[int, int]) -> go.Figure:
    """Rows = variants, columns = the 21 VOC classes + mIoU, colour and text = IoU in %.

    A class with no image in the subset is an empty cell labelled "no images", never a 0.
    Hover: IoU, TP / FP / FN pixels and the number of images holding the class.
    """
    z = np.concatenate([table.iou, table.miou[:, None]], axis=1) * 100
    n_classes = np.isfinite(table.iou).sum(axis=1)
    text, hover = [], []
    for v in range(len(table.names)):
        text_row, hover_row = [], []
        for c, class_name in enumerate(VOC_CLASSES):
            counts = (f"TP {table.tp[v, c]:,} · FP {table.fp[v, c]:,} · FN {table.fn[v, c]:,} px"
                      f"<br>{table.n_images[v, c]} image(s) with {class_name}")
            if np.isfinite(table.iou[v, c]):
                text_row.append(f"{100 * table.iou[v, c]:.1f}")
                hover_row.append(f"<b>{class_name}</b>: IoU {100 * table.iou[v, c]:.2f}%<br>{counts}")
            else:
                text_row.append("no images")
                hover_row.append(f"<b>{class_name}</b>: no image of this class in the subset<br>{counts}")
        text_row.append(f"{table.miou[v] * 100:.1f}" if np.isfinite(table.miou[v]) else "")
        hover_row.append(f"<b>mIoU</b> {table.miou[v] * 100:.2f}% over {n_classes[v]} classes with images"
                         f"<br>{table.labelled[v]} label maps")
        text.append(text_row)
        hover.append(hover_row)
    labels = row_labels(table)
    figure = go.Figure(go.Heatmap(
        z=z, x=column_labels(class_images), y=[f"{name} · {n} imgs" for name, n in zip(labels, table.labelled)],
        text=text, texttemplate="%{text}", textfont={"size": 13}, hovertext=hover, hovertemplate="%{hovertext}<extra>%{y}</extra>",
        colorscale="Viridis", zmin=0, zmax=100, colorbar={"title": "IoU %"}, xgap=2, ygap=2,
    ))
    figure.update_layout(height=160 + 48 * len(labels), margin={"l": 10, "r": 10, "t": 30, "b": 10},
                         xaxis={"side": "top", "tickangle": -45}, yaxis={"autorange": "reversed"},
                         plot_bgcolor="#eeeeee")
    return figure
