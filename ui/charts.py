"""Plotly figures of the pages (presentation only; the numbers come from ``cache.reports``,
``engine.runtime.trainings`` and ``engine.isle.assignments``).

The per-class heatmaps have one column per class of the dataset's class set (``IoUTable.classes``;
label value = column of the table's ``(V, C)`` arrays) and a frozen mIoU column: mIoU is a panel
of its own left of the classes, so it stays first and in view while the class columns are
sorted, hidden (``column_order``), zoomed or panned. Cell size, text and label angle follow the
number of columns and rows (``_style``), so the many columns of a COCO class set stay legible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cache.classes import ClassSet
from cache.reports import GainTable, IoUTable, tree_order
from engine.isle.assignments import BudgetRow
from engine.runtime.trainings import TrainingRow

COLUMN_SORTS = {"label": "label value", "iou_low": "IoU, lowest first", "iou_high": "IoU, highest first",
                "images": "images, most first"}
"""How the class columns of a heatmap are ordered (``column_order``); in the gain view "IoU" is the gain."""

MIOU_PX = 70  # the frozen mIoU column's width when class cells are narrower

CLASS_TARGETS, MIOU_TARGETS = 2, 3
"""Curve numbers of the invisible click targets of a heatmap (see ``_figure``): a selection
point's ``curve_number`` says which panel was clicked (``clicked_cell``)."""


def row_labels(table: IoUTable) -> list[str]:
    """Variant names, with the id added where two variants share a name (different parameters)."""
    seen = {name: table.names.count(name) for name in table.names}
    return [f"{name} [{vid}]" if seen[name] > 1 else name for name, vid in zip(table.names, table.variant_ids)]


def column_labels(classes: ClassSet, class_images: Mapping[int, int],
                  columns: Sequence[int] | None = None) -> list[str]:
    """``"cat (12)"`` per class of ``columns`` (default: every class, in label order), ``"bicycle
    (no images)"`` for one no image of the subset holds; class_images: ``queries.class_image_counts``."""
    labels = []
    for class_id in range(classes.num_classes) if columns is None else columns:
        n = class_images.get(class_id, 0)
        labels.append(f"{classes.name(class_id)} ({n})" if n else f"{classes.name(class_id)} (no images)")
    return labels


def empty_classes(classes: ClassSet, class_images: Mapping[int, int]) -> list[int]:
    """The label values no usable image of the subset holds, ascending."""
    return [c for c in range(classes.num_classes) if not class_images.get(c)]


def _mean_over_rows(values: np.ndarray) -> np.ndarray:
    """``(R, C) -> (C,)`` mean of the finite values of each column, NaN where there is none."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=0)
    return np.where(finite.any(axis=0), total / np.maximum(finite.sum(axis=0), 1), np.nan)


def column_order(table: IoUTable, class_images: Mapping[int, int], sort: str = "label", by: str | None = None,
                 hide_empty: bool = False, gain: GainTable | None = None) -> list[int]:
    """The class columns to show (label values), in order.

    sort: a key of ``COLUMN_SORTS``. For the IoU sorts the value is the IoU of the row of variant
    ``by`` (None: the mean over the rows that have one), or with ``gain`` its gain (``by`` then
    names the refined variant of a pair); classes without a value come last. "images": most
    images of the subset first. Ties keep label order. hide_empty: leave out the classes no image
    of the subset holds (``empty_classes``).
    """
    if sort not in COLUMN_SORTS:
        raise ValueError(f"unknown column sort {sort!r}; expected one of {list(COLUMN_SORTS)}")
    columns = list(range(table.classes.num_classes))
    if hide_empty:
        empty = set(empty_classes(table.classes, class_images))
        columns = [c for c in columns if c not in empty]
    if sort == "images":
        return sorted(columns, key=lambda c: (-class_images.get(c, 0), c))
    if sort == "label":
        return columns
    if gain is None:
        values, ids = table.iou, table.variant_ids
    else:
        values, ids = gain.gain, [table.variant_ids[r] for r in gain.rows]
    if by is not None and by not in ids:
        raise KeyError(f"variant {by!r} is not a row of the heatmap")
    key = values[ids.index(by)] if by is not None else _mean_over_rows(values) if len(ids) else \
        np.full(table.classes.num_classes, np.nan)
    sign = -1.0 if sort == "iou_high" else 1.0
    return sorted(columns, key=lambda c: (not np.isfinite(key[c]), sign * key[c] if np.isfinite(key[c]) else 0.0, c))


def clicked_cell(point: Mapping, columns: Sequence[int]) -> tuple[int, int | None]:
    """The cell of a heatmap selection point: ``(row position among the shown rows, class id)``,
    class id None for the mIoU column. ``columns``: the class columns the figure was drawn with
    (``column_order``); the point's index counts the class targets row by row over them."""
    if point["curve_number"] == MIOU_TARGETS:
        return int(point["point_index"]), None
    if point["curve_number"] != CLASS_TARGETS:
        raise ValueError(f"point of curve {point['curve_number']} is no heatmap cell")
    row, column = divmod(int(point["point_index"]), len(columns))
    return row, columns[column]


def cell_link(point: Mapping, columns: Sequence[int], cells: Sequence[tuple[str, str | None]], classes: ClassSet,
              dataset_id: str, split: str) -> dict[str, str]:
    """The Pseudo-label QA query parameters a click on a heatmap cell opens.

    cells: per shown row ``(variant, other)``: other None for an IoU row (sort by error pixels),
    else the refined variant of a gain row (sort by gain, lowest first). A class column adds its
    class (by name); the mIoU column sorts by the whole image.
    """
    row, class_id = clicked_cell(point, columns)
    variant, other = cells[row]
    link = {"dataset": dataset_id, "split": split, "variant": variant, "sort": "errors" if other is None else "gain"}
    if other is not None:
        link |= {"other": other, "descending": "0"}
    if class_id is not None:
        link["class"] = classes.name(class_id)
    return link


def _signed(points: float, decimals: int = 1) -> str:
    """A difference in IoU points with its sign, a true minus: "+3.1", "−2.0"."""
    return f"{points:+.{decimals}f}".replace("-", "\u2212")


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


@dataclass(frozen=True)
class _Style:
    """How big a heatmap's cells and texts are for its number of class columns."""

    font: int  # cell text size, px
    angle: int  # x tick label angle
    decimals: int  # of the cell texts
    wide: bool  # cells wide enough for words ("no images")
    row_height: int  # px
    cell_width: float  # px, estimated for a ~1,300 px wide chart


def _style(n_columns: int) -> _Style:
    """Up to 25 class columns (VOC): 13 px text, one decimal, labels at 45°; up to 45: 11 px,
    labels upright; more (COCO): 9 px whole numbers. An empty cell says "no images" where that
    fits, else "–" (the column label and the hover say it). Zoom (drag a box) brings any part up close."""
    cell_width = 1300 / (n_columns + 2)
    if n_columns <= 25:
        return _Style(13, -45, 1, cell_width >= 75, 48, cell_width)
    if n_columns <= 45:
        return _Style(11, -90, 1, False, 40, cell_width)
    return _Style(9, -90, 0, False, 34, cell_width)


def _figure(z_miou: np.ndarray, z: np.ndarray, x: list[str], y: list[str], text_miou: list[str],
            text: list[list[str]], hover_miou: list[str], hover: list[list[str]], style: _Style,
            ticks: list[str] | None = None, **colours) -> go.Figure:
    """The shared heatmap layout: a frozen mIoU panel (``z_miou (R,)``) left of the class panel
    (``z (R, K)``, columns ``x``); ``y`` are the full row names (hover), ``ticks`` their shown
    text (default: ``y`` shortened by ``ellipsize``). ``colours``: the shared colour axis.

    Traces: 0 the class heatmap, 1 the mIoU heatmap, then invisible square markers on every
    cell carrying the hover: ``CLASS_TARGETS`` (row by row: point index = row * K + column) and
    ``MIOU_TARGETS`` (point index = row). Plotly reports no click or selection on a heatmap
    trace, and ``st.plotly_chart(on_select=...)`` needs one to let a click open a cell's images.
    The class axis zooms and pans; the mIoU axis is fixed; rows zoom together.
    """
    k = max(len(x), 1)
    miou_width = max(1.0, MIOU_PX * (k + 1) / 1300)  # in class cells: about MIOU_PX px, at least one cell
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[miou_width, k],
                           horizontal_spacing=min(0.02, 8 / 1300))
    cell = {"texttemplate": "%{text}", "textfont": {"size": style.font}, "hoverinfo": "skip", "xgap": 2, "ygap": 2,
            "coloraxis": "coloraxis"}
    figure.add_trace(go.Heatmap(z=z, x=x, y=y, text=text, **cell), row=1, col=2)
    figure.add_trace(go.Heatmap(z=z_miou[:, None], x=["mIoU"], y=y, text=[[t] for t in text_miou], **cell),
                     row=1, col=1)
    size = max(6, min(style.row_height - 6, style.cell_width - 2))
    target = {"hovertemplate": "%{hovertext}<extra>%{y}</extra>", "mode": "markers", "showlegend": False,
              "selected": {"marker": {"opacity": 0}}, "unselected": {"marker": {"opacity": 0}}}
    figure.add_trace(go.Scatter(
        x=[column for _ in y for column in x], y=[row for row in y for _ in x],
        hovertext=[c for row in hover for c in row], marker={"symbol": "square", "size": size, "opacity": 0}, **target,
    ), row=1, col=2)
    figure.add_trace(go.Scatter(
        x=["mIoU"] * len(y), y=y, hovertext=hover_miou,
        marker={"symbol": "square", "size": max(6, style.row_height - 6), "opacity": 0}, **target,
    ), row=1, col=1)
    longest = max((len(label) for label in x), default=4)
    label_space = 30 + int(0.62 * style.font * longest * (1.0 if style.angle == -90 else 0.72))
    figure.update_layout(height=label_space + 40 + style.row_height * len(y),
                         margin={"l": 10, "r": 10, "t": label_space, "b": 10}, plot_bgcolor="#eeeeee",
                         coloraxis=colours)
    # automargin explicitly: Streamlit's plotly template leaves it off, which cut the row labels.
    # Explicit ranges (the click targets' markers would pad them) and every class label (Plotly
    # thins dense category labels out).
    figure.update_xaxes(side="top", tickangle=style.angle, type="category", tickfont={"size": max(style.font, 10)},
                        automargin=True, tickmode="array", tickvals=x, ticktext=x, range=[-0.5, len(x) - 0.5],
                        row=1, col=2)
    figure.update_xaxes(side="top", type="category", automargin=True, fixedrange=True, range=[-0.5, 0.5], row=1, col=1)
    figure.update_yaxes(type="category", automargin=True, range=[len(y) - 0.5, -0.5])
    figure.update_yaxes(ticks="", row=1, col=2)
    figure.update_yaxes(tickmode="array", tickvals=y, ticktext=ticks or [ellipsize(label) for label in y], row=1, col=1)
    return figure


def _no_truth(table: IoUTable, v: int) -> bool:
    return int(table.with_truth[v]) == 0


def iou_heatmap(table: IoUTable, class_images: Mapping[int, int], view: str = "flat",
                columns: Sequence[int] | None = None) -> go.Figure:
    """Rows = variants, then the frozen mIoU column and the class columns of ``table.classes``
    (``columns``, label values in the order to show; default every class), colour and text =
    IoU in %.

    ``view`` "flat" keeps the table's order; "grouped" puts every refinement under its source
    (``tree_order``), labelled by its own step, the full name staying the row's hover title.
    A class with no image in the subset is an empty cell labelled "no images", never a 0; a row
    whose label maps have no ground truth at all shows "no GT" and no number.
    Hover: IoU, TP / FP / FN pixels and the number of images holding the class.
    """
    classes = table.classes
    columns = list(range(classes.num_classes)) if columns is None else list(columns)
    style = _style(len(columns))
    order = tree_order(table)[0] if view == "grouped" else list(range(len(table.names)))
    z = table.iou[order][:, columns] * 100
    z_miou = table.miou[order] * 100
    n_classes = np.isfinite(table.iou).sum(axis=1)
    text, hover, text_miou, hover_miou = [], [], [], []
    for v in order:
        truth = (f"{table.labelled[v]:,} label maps, {table.with_truth[v]:,} of them on images with ground truth")
        text_row, hover_row = [], []
        for c in columns:
            class_name = classes.name(c)
            counts = (f"TP {table.tp[v, c]:,} · FP {table.fp[v, c]:,} · FN {table.fn[v, c]:,} px"
                      f"<br>{table.n_images[v, c]} image(s) with {class_name}")
            if _no_truth(table, v):
                text_row.append("")
                hover_row.append(f"<b>{class_name}</b>: no ground truth<br>{truth}")
            elif np.isfinite(table.iou[v, c]):
                text_row.append(f"{100 * table.iou[v, c]:.{style.decimals}f}")
                hover_row.append(f"<b>{class_name}</b>: IoU {100 * table.iou[v, c]:.2f}%<br>{counts}")
            else:
                text_row.append("no images" if style.wide else "–")
                hover_row.append(f"<b>{class_name}</b>: no image of this class with ground truth in the subset"
                                 f"<br>{counts}")
        text.append(text_row)
        hover.append(hover_row)
        if _no_truth(table, v):
            text_miou.append("no GT")
            hover_miou.append(f"<b>mIoU</b>: no ground truth<br>{truth}")
        else:
            text_miou.append(f"{table.miou[v] * 100:.1f}" if np.isfinite(table.miou[v]) else "")
            hover_miou.append(f"<b>mIoU</b> {table.miou[v] * 100:.2f}% over {n_classes[v]} classes with images"
                              f"<br>{truth}")
    labels = row_labels(table)
    y = [f"{labels[v]} · {table.labelled[v]} imgs" for v in order]
    figure = _figure(z_miou, z, column_labels(classes, class_images, columns), y, text_miou, text, hover_miou, hover,
                     style, ticks=tree_labels(table) if view == "grouped" else None,
                     colorscale="Viridis", cmin=0, cmax=100, colorbar={"title": {"text": "IoU %"}})
    if view == "grouped":
        figure.update_yaxes(tickfont={"family": "monospace"}, row=1, col=1)
    return figure


def gain_heatmap(table: IoUTable, gain: GainTable, class_images: Mapping[int, int],
                 columns: Sequence[int] | None = None) -> go.Figure:
    """Rows = "refined vs source" pairs, then the frozen mIoU column and the class columns
    (``columns``, default every class), colour and text = the IoU difference in points: blue
    where the refinement helps, red where it hurts, centred on 0.

    Hover: both IoUs and the number of label maps of each (they differ while a job is running).
    """
    classes = table.classes
    columns = list(range(classes.num_classes)) if columns is None else list(columns)
    style = _style(len(columns))
    z = gain.gain[:, columns] * 100
    z_miou = gain.miou_gain * 100
    both = np.concatenate([z, z_miou[:, None]], axis=1)
    # Symmetric around 0, at least ±1 point so that tiny differences are not drawn saturated.
    limit = max(float(np.nanmax(np.abs(both))) if np.isfinite(both).any() else 0.0, 1.0)
    labels = row_labels(table)

    def cell(r: int, s: int, name: str, diff: float, refined: float, source: float, decimals: int) -> tuple[str, str]:
        maps = f"<br>{table.labelled[r]} vs {table.labelled[s]} label maps"
        if np.isfinite(diff):
            return (_signed(diff, decimals),
                    f"<b>{name}</b>: {refined:.2f}% vs {source:.2f}% ({_signed(diff)} points){maps}")
        return ("no images" if style.wide else "–"), f"<b>{name}</b>: no image of this class in one of the two{maps}"

    text, hover, text_miou, hover_miou = [], [], [], []
    for k, (r, s) in enumerate(zip(gain.rows, gain.sources)):
        pairs = [cell(r, s, classes.name(c), z[k, j], 100 * table.iou[r, c], 100 * table.iou[s, c], style.decimals)
                 for j, c in enumerate(columns)]
        text.append([t for t, _ in pairs])
        hover.append([h for _, h in pairs])
        t, h = cell(r, s, "mIoU", z_miou[k], 100 * table.miou[r], 100 * table.miou[s], 1)
        text_miou.append(t)
        hover_miou.append(h)
    y = [f"{labels[r]} vs {labels[s]}" for r, s in zip(gain.rows, gain.sources)]
    ticks = [ellipsize(labels[r]) for r in gain.rows]  # the refined variant: its last step is the refinement
    return _figure(z_miou, z, column_labels(classes, class_images, columns), y, text_miou, text, hover_miou, hover,
                   style, ticks=ticks, colorscale="RdBu", cmid=0, cmin=-limit, cmax=limit,
                   colorbar={"title": {"text": "IoU gain, points"}})


def iou_numbers(table: IoUTable, class_images: Mapping[int, int], columns: Sequence[int] | None = None) -> list[dict]:
    """The heatmap's numbers as table rows: variant, label maps, images with ground truth, mIoU
    and the class ``columns`` (labelled like the heatmap), IoU in % rounded to 0.01, None where
    there is no figure."""
    columns = list(range(table.classes.num_classes)) if columns is None else list(columns)
    names = column_labels(table.classes, class_images, columns)

    def pct(value: float) -> float | None:
        return None if not np.isfinite(value) else round(100 * float(value), 2)

    return [{"variant": label, "label maps": int(n), "with ground truth": int(t), "mIoU": pct(table.miou[v]),
             **{name: pct(table.iou[v, c]) for name, c in zip(names, columns)}}
            for v, (label, n, t) in enumerate(zip(row_labels(table), table.labelled, table.with_truth))]


def truth_note(table: IoUTable) -> str | None:
    """What the figures are computed over, when not every label map has ground truth; None when
    they all do. "No ground truth: ..." when none has (no IoU can be shown)."""
    labelled, truth = int(table.labelled.sum()), int(table.with_truth.sum())
    if truth == 0:
        return (f"No ground truth: {labelled:,} label maps, 0 images with masks — per-class figures "
                "need masks.")
    pairs = sorted({(int(t), int(n)) for t, n in zip(table.with_truth, table.labelled)})
    if all(t == n for t, n in pairs):
        return None
    if len(pairs) == 1:
        (t, n), = pairs
        return f"IoU over {t:,} of {n:,} labelled images (the ones with ground truth)."
    return ("IoU over the labelled images that have ground truth: "
            + ", ".join(f"{t:,} of {n:,}" for t, n in pairs) + " depending on the variant (see the numbers).")


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


# --- the labelled-budget curve (app_pages/ensemble.py) ------------------------------------------


def budget_chart(rows: Sequence[BudgetRow]) -> go.Figure:
    """Report-subset mIoU (%) against the n labelled selection images (log axis): one line per rule
    of ``BudgetRow.mean`` (Algorithm 2, the stable rule, best single), error bars ± the spread
    over the draws."""
    figure = go.Figure()
    for rule in rows[0].mean if rows else ():
        figure.add_scatter(x=[r.n for r in rows], y=[r.mean[rule] for r in rows], mode="lines+markers", name=rule,
                           error_y={"type": "data", "array": [r.spread[rule] for r in rows], "visible": True})
    figure.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Labelled-budget curve",
                         xaxis={"title": "labelled selection images n", "type": "log"},
                         yaxis_title="report mIoU %", legend={"orientation": "h", "y": -0.25})
    return figure
