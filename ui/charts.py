"""Plotly figures of the pages (presentation only; the numbers come from ``cache.reports``,
``cache.diagnostics``, ``engine.runtime.trainings`` and ``engine.isle.assignments``).

The per-class heatmaps have one column per class of the dataset's class set (``IoUTable.classes``;
label value = column of the table's ``(V, C)`` arrays) and a frozen mIoU column: mIoU is a panel
of its own left of the classes, so it stays first and in view while the class columns are
sorted, hidden (``column_order``), zoomed or panned. Cell size, text and label angle follow the
number of columns and rows (``_style``), so the many columns of a COCO class set stay legible.

Beside the IoU heatmap (``iou_heatmap`` with another ``metric``, under an undecided rule,
with a threshold-sweep row): the sweep's mIoU curve, the tuned thresholds' tables and the class
confusion matrix with its link into Pseudo-label QA (``confusion_link``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from cache.classes import ClassSet
from cache.diagnostics import ConfusionMatrix, SweepTable, TunedThresholds, Undecided, apply_undecided, metric_values
from cache.reports import GainTable, IoUTable, insert_row, recount, tree_order
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


def tree_labels(table: IoUTable, suffixes: Sequence[str] | None = None) -> list[str]:
    """Tick text of the grouped view, in ``tree_order``: a root keeps its row label, a refinement
    shows only its own step, indented under its source ("CAM", "   └ dCRF", "      └ dCRF"; a
    threshold-sweep row "   └ @ 0.25 (sweep)"). suffixes: per table row, text added at the end.

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
            source = table.names[index[table.source_ids[row]]]
            own = table.names[row].removeprefix(source + " → ").removeprefix(source + " ")
            label = "\u00a0" * (3 * depth) + "└ " + own
        ticks.append(ellipsize(f"{label} · {table.labelled[row]} imgs{suffixes[row] if suffixes else ''}"))
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
            ticks: list[str] | None = None, mean_label: str = "mIoU", **colours) -> go.Figure:
    """The shared heatmap layout: a frozen mean panel (``z_miou (R,)``, column ``mean_label``) left
    of the class panel (``z (R, K)``, columns ``x``); ``y`` are the full row names (hover), ``ticks``
    their shown text (default: ``y`` shortened by ``ellipsize``). ``colours``: the shared colour axis.

    Traces: 0 the class heatmap, 1 the mIoU heatmap, then invisible square markers on every
    cell carrying the hover: ``CLASS_TARGETS`` (row by row: point index = row * K + column) and
    ``MIOU_TARGETS`` (point index = row). Plotly reports no click or selection on a heatmap
    trace, and ``st.plotly_chart(on_select=...)`` needs one to let a click open a cell's images.
    The class axis zooms and pans; the mIoU axis is fixed; rows zoom together.
    """
    k = max(len(x), 1)
    miou_width = max(1.0, MIOU_PX * (k + 1) / 1300)  # in class cells: about MIOU_PX px, at least one cell
    # The two panels' domains as make_subplots(column_widths=[miou_width, k]) lays them out; the
    # figure is built from one dict because plotly's per-call updates cost most of a redraw.
    spacing = min(0.02, 8 / 1300)
    split = (1 - spacing) * miou_width / (miou_width + k)
    cell = {"type": "heatmap", "texttemplate": "%{text}", "textfont": {"size": style.font}, "hoverinfo": "skip",
            "xgap": 2, "ygap": 2, "coloraxis": "coloraxis"}
    size = max(6, min(style.row_height - 6, style.cell_width - 2))
    target = {"type": "scatter", "hovertemplate": "%{hovertext}<extra>%{y}</extra>", "mode": "markers",
              "showlegend": False, "selected": {"marker": {"opacity": 0}}, "unselected": {"marker": {"opacity": 0}}}
    data = [
        {**cell, "z": z, "x": x, "y": y, "text": text, "xaxis": "x2", "yaxis": "y2"},
        {**cell, "z": z_miou[:, None], "x": [mean_label], "y": y, "text": [[t] for t in text_miou],
         "xaxis": "x", "yaxis": "y"},
        {**target, "x": [column for _ in y for column in x], "y": [row for row in y for _ in x],
         "hovertext": [c for row in hover for c in row], "marker": {"symbol": "square", "size": size, "opacity": 0},
         "xaxis": "x2", "yaxis": "y2"},
        {**target, "x": [mean_label] * len(y), "y": y, "hovertext": hover_miou,
         "marker": {"symbol": "square", "size": max(6, style.row_height - 6), "opacity": 0}, "xaxis": "x", "yaxis": "y"},
    ]
    longest = max((len(label) for label in x), default=4)
    label_space = 30 + int(0.62 * style.font * longest * (1.0 if style.angle == -90 else 0.72))
    rows = {"type": "category", "automargin": True, "range": [len(y) - 0.5, -0.5], "domain": [0.0, 1.0]}
    # automargin explicitly: Streamlit's plotly template leaves it off, which cut the row labels.
    # Explicit ranges (the click targets' markers would pad them) and every class label (Plotly
    # thins dense category labels out).
    layout = {
        "height": label_space + 40 + style.row_height * len(y),
        "margin": {"l": 10, "r": 10, "t": label_space, "b": 10}, "plot_bgcolor": "#eeeeee", "coloraxis": colours,
        "xaxis": {"anchor": "y", "domain": [0.0, split], "side": "top", "type": "category", "automargin": True,
                  "fixedrange": True, "range": [-0.5, 0.5]},
        "xaxis2": {"anchor": "y2", "domain": [split + spacing, 1.0], "side": "top", "tickangle": style.angle,
                   "type": "category", "tickfont": {"size": max(style.font, 10)}, "automargin": True,
                   "tickmode": "array", "tickvals": x, "ticktext": x, "range": [-0.5, len(x) - 0.5]},
        "yaxis": {**rows, "anchor": "x", "tickmode": "array", "tickvals": y,
                  "ticktext": ticks or [ellipsize(label) for label in y]},
        "yaxis2": {**rows, "anchor": "x2", "matches": "y", "showticklabels": False, "ticks": ""},
    }
    return go.Figure({"data": data, "layout": layout})


def _no_truth(table: IoUTable, v: int) -> bool:
    return int(table.with_truth[v]) == 0


def iou_heatmap(table: IoUTable, class_images: Mapping[int, int], view: str = "flat",
                columns: Sequence[int] | None = None, metric: str = "iou",
                coverage: np.ndarray | None = None) -> go.Figure:
    """Rows = variants, then the frozen mean column and the class columns of ``table.classes``
    (``columns``, label values in the order to show; default every class), colour and text =
    ``metric`` (a key of ``cache.diagnostics.METRICS``, default IoU) in %; the mean column is
    its mean over the classes with images (``metric_table``), labelled ``mean_label(metric)``.

    ``view`` "flat" keeps the table's order; "grouped" puts every refinement under its source
    (``tree_order``), labelled by its own step, the full name staying the row's hover title.
    A class with no image in the subset is an empty cell labelled "no images", never a 0; a row
    whose label maps have no ground truth at all shows "no GT" and no number; a precision of a
    class the variant never predicts is "–". coverage: ``(V,)`` share of ground-truth pixels the
    row decides (``undecided_rule``; NaN: unknown), shown after the row label and in its mean's hover.
    Hover: all five ``METRICS``, TP / FP / FN pixels and the number of images holding the class.
    The error shares are coloured reversed (low is good, as a high IoU).
    """
    classes = table.classes
    columns = list(range(classes.num_classes)) if columns is None else list(columns)
    style = _style(len(columns))
    order = tree_order(table)[0] if view == "grouped" else list(range(len(table.names)))
    values, means, n_classes = metric_table(table, metric)
    every = {m: metric_table(table, m)[0] for m in METRIC_NAMES}
    name, mean = METRIC_NAMES[metric], mean_label(metric)
    z = values[order][:, columns] * 100
    z_miou = means[order] * 100
    suffixes = [""] * len(table.names) if coverage is None else [f" · {coverage_text(x)}" for x in coverage]
    text, hover, text_miou, hover_miou = [], [], [], []
    for v in order:
        truth = (f"{table.labelled[v]:,} label maps, {table.with_truth[v]:,} of them on images with ground truth")
        text_row, hover_row = [], []
        for c in columns:
            class_name = classes.name(c)
            figures = " · ".join(f"{METRIC_NAMES[m]} {_percent(every[m][v, c])}" for m in METRIC_NAMES)
            counts = (f"{figures}<br>TP {table.tp[v, c]:,} · FP {table.fp[v, c]:,} · FN {table.fn[v, c]:,} px"
                      f"<br>{table.n_images[v, c]} image(s) with {class_name}")
            if _no_truth(table, v):
                text_row.append("")
                hover_row.append(f"<b>{class_name}</b>: no ground truth<br>{truth}")
            elif np.isfinite(values[v, c]):
                text_row.append(f"{100 * values[v, c]:.{style.decimals}f}")
                hover_row.append(f"<b>{class_name}</b>: {name} {100 * values[v, c]:.2f}%<br>{counts}")
            elif table.n_images[v, c] > 0:  # only a precision can be undefined here: nothing predicted
                text_row.append("–")
                hover_row.append(f"<b>{class_name}</b>: no {name}, the variant never predicts it<br>{counts}")
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
            text_miou.append(f"{means[v] * 100:.1f}" if np.isfinite(means[v]) else "")
            over = "classes with images" if metric == "iou" else f"classes with images and a {name}"
            hover_miou.append(f"<b>{mean}</b> {means[v] * 100:.2f}% over {n_classes[v]} {over}<br>{truth}"
                              + (f"<br>{coverage_text(coverage[v])} of the ground-truth pixels decided"
                                 if coverage is not None else ""))
    labels = row_labels(table)
    y = [f"{labels[v]} · {table.labelled[v]} imgs{suffixes[v]}" for v in order]
    figure = _figure(z_miou, z, column_labels(classes, class_images, columns), y, text_miou, text, hover_miou, hover,
                     style, ticks=tree_labels(table, suffixes) if view == "grouped" else None, mean_label=mean,
                     colorscale="Viridis_r" if metric in ERROR_SHARES else "Viridis", cmin=0, cmax=100,
                     colorbar={"title": {"text": f"{name} %"}})
    if view == "grouped":
        figure.update_layout(yaxis_tickfont={"family": "monospace"})
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


def iou_numbers(table: IoUTable, class_images: Mapping[int, int], columns: Sequence[int] | None = None,
                metric: str = "iou", coverage: np.ndarray | None = None) -> list[dict]:
    """The heatmap's numbers as table rows: variant, label maps, images with ground truth (then
    "coverage" when given, as ``coverage_text``), the mean (``mean_label(metric)``) and the class
    ``columns`` (labelled like the heatmap), ``metric`` in % rounded to 0.01, None where there is
    no figure."""
    columns = list(range(table.classes.num_classes)) if columns is None else list(columns)
    names = column_labels(table.classes, class_images, columns)
    values, means, _ = metric_table(table, metric)
    return [{"variant": label, "label maps": int(n), "with ground truth": int(t),
             **({} if coverage is None else {"coverage": coverage_text(coverage[v]).removeprefix("coverage ")}),
             mean_label(metric): _pct(means[v]), **{name: _pct(values[v, c]) for name, c in zip(names, columns)}}
            for v, (label, n, t) in enumerate(zip(row_labels(table), table.labelled, table.with_truth))]


def _pct(value: float) -> float | None:
    """A share in [0, 1] as % rounded to 0.01; None for NaN."""
    return None if not np.isfinite(value) else round(100 * float(value), 2)


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


# --- diagnostics beside per-class IoU (app_pages/per_class_iou.py) ---------------------------

METRIC_NAMES = {"iou": "IoU", "precision": "precision", "recall": "recall", "fp share": "FP share",
                "fn share": "FN share"}
"""Display names of ``cache.diagnostics.METRICS``, in its order."""

ERROR_SHARES = ("fp share", "fn share")  # lower is better: their colour scale is reversed

SWEEP_MARK = "@"  # a threshold-sweep row's id: "<variant id>@<threshold>" (no variant id holds "@")

CONFUSION_TARGETS = 1
"""Curve number of the confusion matrix's invisible click targets (``confusion_link``)."""


def mean_label(metric: str) -> str:
    """The mean column's label: "mIoU" for IoU, else "mean precision" etc."""
    return "mIoU" if metric == "iou" else f"mean {METRIC_NAMES[metric]}"


def metric_table(table: IoUTable, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``METRICS`` figure of every cell of ``table``: values ``(V, C) float64`` in [0, 1] from
    its TP, FP, FN (``cache.diagnostics.metric_values``), NaN where no image holds the class or
    the figure is undefined (precision of a class never predicted); the ``(V,)`` mean over the
    classes with a value (NaN for none) and ``(V,) int64`` how many those are. IoU is the
    table's own ``iou`` and ``miou``."""
    if metric == "iou":
        values, means = table.iou, table.miou
    else:
        values = np.where(table.n_images > 0, metric_values(table.tp, table.fp, table.fn, metric), np.nan)
        means = _mean_over_rows(values.T) if values.size else np.full(len(values), np.nan)
    return values, means, np.isfinite(values).sum(axis=1)


def _percent(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{100 * value:.2f}%"


def coverage_text(value: float) -> str:
    """"coverage 97.31%", or "coverage unknown" (NaN: no confusion rows, recorded before schema 8)."""
    return f"coverage {_percent(value)}" if np.isfinite(value) else "coverage unknown"


def undecided_rule(table: IoUTable, held: Undecided, rule: str) -> tuple[IoUTable, np.ndarray]:
    """``table`` under an ``UNDECIDED`` rule and each row's coverage ``(V,)`` (NaN: unknown).

    held: ``cache.diagnostics.undecided`` of ``table.variant_ids`` (same order). "ignore" takes
    each row's undecided pixels out of its FN (``apply_undecided``); a row whose undecided
    pixels are unknown keeps its counts (a predicted 255 stays a miss there).
    """
    if held.pixels.shape != table.tp.shape:
        raise ValueError(f"expected undecided pixels of shape {table.tp.shape}, got {held.pixels.shape}")
    pixels = np.where(held.known[:, None], held.pixels, 0)
    tp, fp, fn, coverage = apply_undecided(table.tp, table.fp, table.fn, pixels, rule)
    return recount(table, tp, fp, fn), np.where(held.known, coverage, np.nan)


def sweep_row_id(variant_id: str, threshold: float) -> str:
    return f"{variant_id}{SWEEP_MARK}{threshold:.2f}"


def real_variant(row_id: str) -> str:
    """The variant a heatmap row shows: a sweep row's (``sweep_row_id``) is the swept variant."""
    return row_id.split(SWEEP_MARK, 1)[0]


def with_sweep_row(table: IoUTable, coverage: np.ndarray, sweep: SweepTable,
                   threshold: float) -> tuple[IoUTable, np.ndarray]:
    """``table`` and ``coverage`` with one more row right after ``sweep``'s variant: its counts
    at ``threshold`` (a grid value of ``sweep``), named "<row label> @ 0.25 (sweep)", id
    ``sweep_row_id``, refining that variant (so the grouped view puts it under it). Its
    coverage is 1 (a label at a threshold decides every pixel). Raises ``ValueError`` for a
    threshold off the grid or a variant without a row."""
    at = np.flatnonzero(np.isclose(sweep.thresholds, threshold))
    if not len(at):
        raise ValueError(f"threshold {threshold} is not on the grid {sweep.thresholds.tolist()}")
    if sweep.variant_id not in table.variant_ids:
        raise ValueError(f"variant {sweep.variant_id!r} is not a row of the table")
    row = table.variant_ids.index(sweep.variant_id)
    name = f"{row_labels(table)[row]} @ {threshold:.2f} (sweep)"
    out = insert_row(table, row + 1, sweep_row_id(sweep.variant_id, threshold), name, sweep.variant_id,
                     int(table.labelled[row]), int(table.with_truth[row]), sweep.counts[int(at[0]), :, :3],
                     sweep.n_images)
    truth = int(sweep.background_pixels + sweep.object_pixels)
    return out, np.insert(coverage, row + 1, 1.0 if truth else np.nan)


def object_thresholds(tuned: TunedThresholds) -> list[float]:
    """The tuned per-class thresholds as ``engine.runtime.jobs.threshold_step`` takes them:
    entry c - 1 for object class c (background's entry dropped)."""
    return [float(t) for t in tuned.thresholds[1:]]


def images_with_truth(table: IoUTable, variant_id: str | None = None) -> int:
    """The images with ground truth a figure of ``variant_id``'s row (None: of the whole table,
    its largest row) is computed over."""
    if variant_id is not None:
        return int(table.with_truth[table.variant_ids.index(variant_id)])
    return int(table.with_truth.max()) if len(table.with_truth) else 0


def nearest(values: Sequence[float], value: float | None) -> float:
    """The entry of ``values`` closest to ``value`` (the first on ties; the middle one for None)."""
    if value is None:
        return values[len(values) // 2]
    return values[int(np.argmin(np.abs(np.asarray(values, dtype=np.float64) - value)))]


def sweep_chart(sweep: SweepTable, own: float | None, chosen: float) -> go.Figure:
    """mIoU (%) against the background threshold (trace 0, bold), then one thin IoU line per class
    with images (legend and hover per class), over ``sweep``'s grid; dashed: the variant's own
    threshold ``own`` (None: not drawn), solid red: the ``chosen`` one."""
    x = sweep.thresholds.tolist()
    data = [{"type": "scatter", "x": x, "y": (sweep.miou * 100).tolist(), "mode": "lines+markers", "name": "mIoU",
             "line": {"width": 3, "color": "#222222"},
             "hovertemplate": "<b>mIoU</b> %{y:.2f}% at %{x:.2f}<extra></extra>"}]
    iou = sweep.metric("iou") * 100
    for c in np.flatnonzero(sweep.has_class):
        name = sweep.classes.name(int(c))
        data.append({"type": "scatter", "x": x, "y": iou[:, c].tolist(), "mode": "lines", "name": name,
                     "line": {"width": 1}, "opacity": 0.7,
                     "hovertemplate": f"<b>{name}</b> IoU %{{y:.2f}}% at %{{x:.2f}}<extra></extra>"})
    marks = ([(own, {"color": "#555555", "dash": "dash"}, f"own {own:.2f}", "right")] if own is not None else [])
    marks.append((chosen, {"color": "#d62728"}, f"slider {chosen:.2f}", "left"))
    # One dict, not add_vline: plotly's per-call updates cost most of a slider redraw.
    layout = {"height": 380, "margin": {"l": 10, "r": 10, "t": 30, "b": 10}, "hovermode": "closest",
              "xaxis": {"title": {"text": "background threshold"}}, "yaxis": {"title": {"text": "IoU %"}},
              "legend": {"orientation": "v"},
              "shapes": [{"type": "line", "x0": t, "x1": t, "xref": "x", "y0": 0, "y1": 1, "yref": "y domain",
                          "line": line} for t, line, _, _ in marks],
              "annotations": [{"x": t, "xref": "x", "y": 1, "yref": "y domain", "text": label, "showarrow": False,
                               "xanchor": anchor, "yanchor": "top"} for t, _, label, anchor in marks]}
    return go.Figure({"data": data, "layout": layout})


TUNE_CHOICES = ("default", "best uniform", "per class")
"""The rows of a ``TunedThresholds``' (3, ...) arrays."""


def tune_rows(tuned: TunedThresholds, selection: SweepTable) -> list[dict]:
    """The tuning summary as table rows, one per ``TUNE_CHOICES``: the threshold(s), mIoU on the
    selection and on the report subset in % (rounded to 0.01) and selection − report: how much
    choosing on the selection's ground truth flatters its figure."""
    grid = selection.thresholds
    objects = tuned.thresholds[1:][selection.has_class[1:]]
    spread = f"{objects.min():.2f} … {objects.max():.2f}" if objects.size else "–"
    thresholds = (f"{grid[tuned.default]:.2f}", f"{grid[tuned.uniform]:.2f}", f"per class: {spread}")
    rows = []
    for k, choice in enumerate(TUNE_CHOICES):
        chosen, report = tuned.selection_miou[k], tuned.report_miou[k]
        rows.append({"threshold": choice, "value": thresholds[k], "selection mIoU": _pct(chosen),
                     "report mIoU": _pct(report), "selection − report": _pct(chosen - report)})
    return rows


def class_threshold_rows(tuned: TunedThresholds, selection: SweepTable, report: SweepTable) -> list[dict]:
    """Per object class with images in the selection: its tuned threshold and its IoU (%) at the
    default and at the tuned threshold, on the selection and on the report subset."""
    return [{"class": selection.classes.name(int(c)), "selection images": int(selection.n_images[c]),
             "report images": int(report.n_images[c]), "threshold": round(float(tuned.thresholds[c]), 2),
             "selection IoU, default": _pct(tuned.selection_iou[0, c]),
             "selection IoU, tuned": _pct(tuned.selection_iou[2, c]),
             "report IoU, default": _pct(tuned.report_iou[0, c]), "report IoU, tuned": _pct(tuned.report_iou[2, c])}
            for c in np.flatnonzero(selection.has_class) if c > 0]


def confusion_shares(matrix: ConfusionMatrix, rule: str) -> np.ndarray:
    """Each row as shares of its ground-truth pixels: ``(C, C + 1)`` (``ConfusionMatrix.normalised``)
    when a predicted 255 is a miss; ``(C, C)`` shares of the decided pixels when it is ignored."""
    if rule == "miss":
        return matrix.normalised()
    decided = matrix.pixels[:, :-1]
    total = decided.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, decided / np.maximum(total, 1), np.nan)


def confusion_cells(matrix: ConfusionMatrix, rule: str, hide_empty: bool = True) -> tuple[list[int], list[int]]:
    """The rows (ground-truth class ids) and columns (predicted class ids, ``C`` = undecided) to
    draw. hide_empty: only classes with a pixel in their row (rows) or column (columns). The
    undecided column is always there when a predicted 255 is a miss, never when it is ignored."""
    size = matrix.classes.num_classes
    pixels = matrix.pixels[:, :size] if rule == "ignore" else matrix.pixels
    rows = [c for c in range(size) if not hide_empty or pixels[c].sum() > 0]
    columns = [c for c in range(size) if not hide_empty or pixels[:, c].sum() > 0]
    return rows, columns + ([size] if rule == "miss" else [])


def _compact(pixels: int) -> str:
    """1234 -> "1.2k", 3456789 -> "3.5M"."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if pixels >= size:
            return f"{pixels / size:.1f}{unit}"
    return str(pixels)


def confusion_heatmap(matrix: ConfusionMatrix, rows: Sequence[int], columns: Sequence[int], rule: str,
                      normalised: bool) -> go.Figure:
    """Rows = ground-truth classes ``rows``, columns = predicted ``columns`` (``confusion_cells``).

    Trace 0 the heatmap: z = share of the row in % (``confusion_shares``) when ``normalised``,
    else log10 of the pixels (NaN for 0; colour bar in pixels); customdata ``(R, K, 3)`` pixels,
    share (in [0, 1]) and images per cell; text the shown value. Trace ``CONFUSION_TARGETS``:
    invisible click targets carrying the hover (point index = row * K + column).
    """
    shares = confusion_shares(matrix, rule)
    rows, columns = list(rows), list(columns)
    pixels = matrix.pixels[np.ix_(rows, columns)]
    share = shares[np.ix_(rows, columns)]
    images = matrix.images[np.ix_(rows, columns)]
    with np.errstate(divide="ignore"):
        z = share * 100 if normalised else np.where(pixels > 0, np.log10(np.maximum(pixels, 1)), np.nan)
    x = [matrix.column_label(c) for c in columns]
    y = [matrix.classes.name(c) for c in rows]
    small = len(columns) > 30
    text = [["" if small or not pixels[i, j] else (f"{100 * share[i, j]:.1f}" if normalised else _compact(int(pixels[i, j])))
             for j in range(len(columns))] for i in range(len(rows))]
    of = "decided pixels" if rule == "ignore" else "pixels"
    hover = [f"<b>{y[i]}</b> labelled <b>{x[j]}</b><br>{pixels[i, j]:,} px, {_percent(share[i, j])} of the {y[i]} "
             f"{of}<br>in {images[i, j]:,} image(s); click to open them in Pseudo-label QA"
             for i in range(len(rows)) for j in range(len(columns))]
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 1.0
    colours = ({"cmin": 0, "cmax": 100, "colorbar": {"title": {"text": "% of row"}}} if normalised else
               {"cmin": 0, "cmax": max(top, 1.0), "colorbar": {
                   "title": {"text": "pixels"}, "tickvals": list(range(int(np.ceil(max(top, 1.0))) + 1)),
                   "ticktext": [_compact(10 ** k) for k in range(int(np.ceil(max(top, 1.0))) + 1)]}})
    figure = go.Figure(go.Heatmap(z=z, x=x, y=y, text=text, texttemplate="%{text}", customdata=np.stack(
        [pixels, share, images], axis=2), hoverinfo="skip", xgap=1, ygap=1, coloraxis="coloraxis",
        textfont={"size": 11}))
    cell = max(6, min(28, int(1100 / max(len(columns), 1)) - 2))
    figure.add_scatter(x=[c for _ in y for c in x], y=[r for r in y for _ in x], hovertext=hover, mode="markers",
                       hovertemplate="%{hovertext}<extra></extra>", showlegend=False,
                       marker={"symbol": "square", "size": cell, "opacity": 0},
                       selected={"marker": {"opacity": 0}}, unselected={"marker": {"opacity": 0}})
    longest = max((len(label) for label in x), default=4)
    figure.update_layout(height=120 + 7 * longest + 26 * len(y), margin={"l": 10, "r": 10, "t": 40 + 7 * longest, "b": 10},
                         plot_bgcolor="#eeeeee", coloraxis={"colorscale": "Viridis", **colours})
    figure.update_xaxes(side="top", type="category", tickangle=-45, title="predicted", automargin=True,
                        tickmode="array", tickvals=x, ticktext=x, range=[-0.5, len(x) - 0.5])
    figure.update_yaxes(type="category", title="ground truth", automargin=True, tickmode="array", tickvals=y,
                        ticktext=y, range=[len(y) - 0.5, -0.5])
    return figure


def confusion_numbers(matrix: ConfusionMatrix, rows: Sequence[int], columns: Sequence[int], rule: str,
                      normalised: bool) -> list[dict]:
    """The drawn cells as table rows: "ground truth" then one entry per column label, pixels
    (int) or the share of the row in % rounded to 0.01 (None for an empty row)."""
    shares = confusion_shares(matrix, rule)
    return [{"ground truth": matrix.classes.name(r),
             **{matrix.column_label(c): _pct(shares[r, c]) if normalised else int(matrix.pixels[r, c])
                for c in columns}} for r in rows]


def confusion_link(point: Mapping, rows: Sequence[int], columns: Sequence[int], classes: ClassSet,
                   dataset_id: str, split: str, variant_id: str) -> dict[str, str]:
    """The Pseudo-label QA query parameters a click on a confusion cell opens: the images with
    the most pixels of ground-truth ``class`` labelled ``as`` (a class name, or "undecided" for
    the 255 column), most first. rows, columns: those the figure was drawn with."""
    if point["curve_number"] != CONFUSION_TARGETS:
        raise ValueError(f"point of curve {point['curve_number']} is no confusion cell")
    row, column = divmod(int(point["point_index"]), len(columns))
    predicted = columns[column]
    return {"dataset": dataset_id, "split": split, "variant": variant_id, "sort": "confusion",
            "class": classes.name(rows[row]),
            "as": "undecided" if predicted == classes.num_classes else classes.name(predicted)}


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
