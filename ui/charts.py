"""Plotly figures of the pages (presentation only; the numbers come from ``cache.reports`` and
``engine.runtime.trainings``)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from cache.reports import GainTable, IoUTable, tree_order
from cache.voc import VOC_CLASSES
from engine.runtime.trainings import TrainingRow


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


def _signed(points: float) -> str:
    """A difference in IoU points with its sign, a true minus: "+3.1", "−2.0"."""
    return f"{points:+.1f}".replace("-", "\u2212")


TICK_CHARS = 60  # longer row labels are shortened in the middle; the hover keeps the full name


def ellipsize(text: str, limit: int = TICK_CHARS) -> str:
    """``text`` cut to ``limit`` characters by replacing its middle with "…", so a chain's source
    (start) and last step (end) both stay readable."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head):]}"


def tree_labels(table: IoUTable) -> list[str]:
    """Tick text of the grouped view, in ``tree_order``: a root keeps its row label, a refinement
    shows only its own step, indented under its source ("CAM", "   └ dCRF", "      └ dCRF").

    Padded to one length with no-break spaces: in a monospace font the labels then line up on
    the left (Plotly right-aligns y tick labels), so the indentation shows.
    """
    order, depths = tree_order(table)
    labels = row_labels(table)
    index = {vid: row for row, vid in enumerate(table.variant_ids)}
    ticks = []
    for row, depth in zip(order, depths):
        label = labels[row]
        if depth:
            own = table.names[row].removeprefix(table.names[index[table.source_ids[row]]] + " → ")
            label = "\u00a0" * (3 * depth) + "└ " + own
        ticks.append(ellipsize(f"{label} · {table.labelled[row]} imgs"))
    width = max(map(len, ticks), default=0)
    return [tick.ljust(width, "\u00a0") for tick in ticks]


def _figure(z: np.ndarray, x: list[str], y: list[str], text: list[list[str]], hover: list[list[str]],
            ticks: list[str] | None = None, **colours) -> go.Figure:
    """The shared heatmap layout; ``y`` are the full row names (hover), ``ticks`` their shown text
    (default: ``y`` shortened by ``ellipsize``).

    Trace 1 is an invisible square marker on every cell, row by row (point index = row * len(x) +
    column), carrying the hover: Plotly reports no click or selection on a heatmap trace, and
    ``st.plotly_chart(on_select=...)`` needs one to let a click on a cell open its images.
    """
    figure = go.Figure(go.Heatmap(
        z=z, x=x, y=y, text=text, texttemplate="%{text}", textfont={"size": 13}, hoverinfo="skip",
        xgap=2, ygap=2, **colours,
    ))
    figure.add_scatter(
        x=[column for _ in y for column in x], y=[row for row in y for _ in x],
        hovertext=[cell for row in hover for cell in row], hovertemplate="%{hovertext}<extra>%{y}</extra>",
        mode="markers", marker={"symbol": "square", "size": 34, "opacity": 0}, showlegend=False,
        selected={"marker": {"opacity": 0}}, unselected={"marker": {"opacity": 0}},
    )
    figure.update_layout(height=160 + 48 * len(y), margin={"l": 10, "r": 10, "t": 30, "b": 10},
                         xaxis={"side": "top", "tickangle": -45}, yaxis={"autorange": "reversed"},
                         plot_bgcolor="#eeeeee")
    figure.update_yaxes(tickmode="array", tickvals=y, ticktext=ticks or [ellipsize(label) for label in y])
    return figure


def iou_heatmap(table: IoUTable, class_images: dict[int, int], view: str = "flat") -> go.Figure:
    """Rows = variants, columns = the 21 VOC classes + mIoU, colour and text = IoU in %.

    ``view`` "flat" keeps the table's order; "grouped" puts every refinement under its source
    (``tree_order``), labelled by its own step, the full name staying the row's hover title.
    A class with no image in the subset is an empty cell labelled "no images", never a 0.
    Hover: IoU, TP / FP / FN pixels and the number of images holding the class.
    """
    order = tree_order(table)[0] if view == "grouped" else list(range(len(table.names)))
    z = np.concatenate([table.iou, table.miou[:, None]], axis=1)[order] * 100
    n_classes = np.isfinite(table.iou).sum(axis=1)
    text, hover = [], []
    for v in order:
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
    y = [f"{labels[v]} · {table.labelled[v]} imgs" for v in order]
    figure = _figure(z, column_labels(class_images), y, text, hover,
                     ticks=tree_labels(table) if view == "grouped" else None,
                     colorscale="Viridis", zmin=0, zmax=100, colorbar={"title": "IoU %"})
    if view == "grouped":
        figure.update_yaxes(tickfont={"family": "monospace"})
    return figure


def gain_heatmap(table: IoUTable, gain: GainTable, class_images: dict[int, int]) -> go.Figure:
    """Rows = "refined vs source" pairs, columns = the 21 classes + mIoU, colour and text = the
    IoU difference in points: blue where the refinement helps, red where it hurts, centred on 0.

    Hover: both IoUs and the number of label maps of each (they differ while a job is running).
    """
    z = np.concatenate([gain.gain, gain.miou_gain[:, None]], axis=1) * 100
    ious = np.concatenate([table.iou, table.miou[:, None]], axis=1) * 100
    # Symmetric around 0, at least ±1 point so that tiny differences are not drawn saturated.
    limit = max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0, 1.0)
    labels = row_labels(table)
    text, hover = [], []
    for r, s, diffs in zip(gain.rows, gain.sources, z):
        text_row, hover_row = [], []
        for c, class_name in enumerate([*VOC_CLASSES, "mIoU"]):
            if np.isfinite(diffs[c]):
                text_row.append(_signed(diffs[c]))
                hover_row.append(f"<b>{class_name}</b>: {ious[r, c]:.2f}% vs {ious[s, c]:.2f}% "
                                 f"({_signed(diffs[c])} points)")
            else:
                text_row.append("no images")
                hover_row.append(f"<b>{class_name}</b>: no image of this class in one of the two")
            hover_row[-1] += f"<br>{table.labelled[r]} vs {table.labelled[s]} label maps"
        text.append(text_row)
        hover.append(hover_row)
    y = [f"{labels[r]} vs {labels[s]}" for r, s in zip(gain.rows, gain.sources)]
    ticks = [ellipsize(labels[r]) for r in gain.rows]  # the refined variant: its last step is the refinement
    return _figure(z, column_labels(class_images), y, text, hover, ticks=ticks, colorscale="RdBu", zmid=0,
                   zmin=-limit, zmax=limit, colorbar={"title": "IoU gain, points"})


# --- final segmentation training (app_pages/train.py) ------------------------------------------


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled to 0)."""
    out, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** k))
    return out


def loss_curve(log: list[dict]) -> go.Figure:
    """The training loss per step (``train_log`` rows named "loss"): the raw points (first trace)
    and their smoothed line."""
    points = [r for r in log if r["name"] == "loss"]
    steps, values = [r["step"] for r in points], [r["value"] for r in points]
    figure = go.Figure([
        go.Scatter(x=steps, y=values, mode="lines", name="loss", line={"color": "rgba(31,119,180,.35)"}),
        go.Scatter(x=steps, y=smooth(values), mode="lines", name="smoothed", line={"color": "#1f77b4"}),
    ])
    figure.update_layout(height=300, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Training loss",
                         xaxis_title="step", yaxis_title="cross-entropy", legend={"orientation": "h", "y": -0.25})
    return figure


def validation_curve(log: list[dict]) -> go.Figure:
    """The validation mIoU (%) at each epoch end (``train_log`` rows named "val_miou", in [0, 1])."""
    points = [r for r in log if r["name"] == "val_miou"]
    figure = go.Figure(go.Scatter(x=[r["step"] for r in points], y=[100 * r["value"] for r in points],
                                  mode="lines+markers", name="val mIoU", line={"color": "#2ca02c"}))
    figure.update_layout(height=300, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                         title="Validation mIoU (epoch ends)", xaxis_title="step", yaxis_title="mIoU %")
    return figure


def miou_bars(rows: list[TrainingRow], title: str) -> go.Figure:
    """One horizontal bar per training (newest first), its label set on the axis, val mIoU in %,
    named ``title`` (the network's); one more bar per test-time refinement (e.g. "+ dCRF")."""
    labels = [ellipsize(f"{r.label_set} [{r.variant_id}]", 50) for r in rows]
    figure = go.Figure(go.Bar(y=labels, x=[r.miou for r in rows], orientation="h", name=title,
                              text=[None if r.miou is None else f"{r.miou:.1f}" for r in rows]))
    for title in dict.fromkeys(x.title for r in rows for x in r.refined):
        values = [next((x.miou for x in r.refined if x.title == title), None) for r in rows]
        figure.add_bar(y=labels, x=values, orientation="h", name=f"+ {title}",
                       text=[None if v is None else f"{v:.1f}" for v in values])
    figure.update_layout(height=140 + 40 * len(rows), margin={"l": 10, "r": 10, "t": 30, "b": 10},
                         barmode="group", xaxis_title="val mIoU %", yaxis={"autorange": "reversed"},
                         legend={"orientation": "h", "y": -0.2})
    return figure
