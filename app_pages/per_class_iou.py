"""Per-class IoU: every variant against the ground truth, class by class, over a split; refine a
variant from here and watch its row appear.

The columns are the classes of the picked dataset (its ``ClassSet``), after a frozen mean
column: sort them by IoU (of one row or the mean) or by images, hide the classes without images,
zoom into the chart. The cells show IoU, precision, recall or an error share
(``cache.diagnostics.METRICS``); a predicted 255 counts as a miss or is ignored (with each
row's coverage). A click on a cell opens its images in Pseudo-label QA.

Below: the background threshold of a swept variant (CAM, ISIM CAM) moved without a job — the
heatmap gets a row "<variant> @ t (sweep)" right under it while the slider is off the
variant's own threshold — with thresholds tuned on a selection subset and scored on the rest,
and buttons that make a real variant at them; then a variant's class confusion matrix, whose
cells open their images in Pseudo-label QA.
"""

from __future__ import annotations

import streamlit as st

from cache import diagnostics, queries, reports
from cache.reports import gain_table, tree_order
from engine.isle.numerics import Subset
from engine.runtime.jobs import threshold_step
from ui.charts import (
    COLUMN_SORTS,
    METRIC_NAMES,
    cell_link,
    class_threshold_rows,
    column_order,
    confusion_cells,
    confusion_heatmap,
    confusion_link,
    confusion_numbers,
    empty_classes,
    gain_heatmap,
    images_with_truth,
    iou_heatmap,
    iou_numbers,
    mean_label,
    nearest,
    object_thresholds,
    real_variant,
    row_labels,
    sweep_chart,
    truth_note,
    tune_rows,
    undecided_rule,
    with_sweep_row,
)
from ui.common import has_active_jobs, jobs_panel, pick_dataset_and_split, queue_chain, read, refinement_steps

VIEWS = {"flat": "flat", "grouped": "grouped by source", "gain": "gain vs source"}
MEAN = "__mean__"  # the "IoU of" choice that sorts by the mean over the rows
NAMED_EMPTY = 12  # at most this many empty classes are named in the note
RULES = {"miss": "counted as a miss (today's IoU)", "ignore": "ignored (coverage shown)"}
CELLS = {"pixels": "pixels", "share": "share of the row"}

st.title("Per-class IoU")
st.caption("IoU = TP / (TP + FP + FN) summed over the split's images, ground-truth pixels labelled "
           "255 ignored. mIoU averages the classes that have at least one image in the split. "
           "Computed from cached per-image counts; no label map is decoded.")

dataset, split = pick_dataset_and_split("Nothing to show yet: queue CAM and CAM → dCRF on the Home page.")
rule = st.radio("Predicted 255 (undecided)", list(RULES), format_func=RULES.get, horizontal=True, key="undecided",
                help="; ".join(diagnostics.UNDECIDED.values()))


def _empty_note(names: list[str], hidden: bool) -> str:
    more = len(names) - NAMED_EMPTY
    shown = ", ".join(names[:NAMED_EMPTY]) + (f" and {more} more" if more > 0 else "")
    where = ("hidden (switch off “Hide classes without images” to see their empty columns)" if hidden
             else "those columns are empty, not 0")
    return f"No image of {shown} in {split}: {where}; left out of the mIoU."


def _protocol(images: int) -> str:
    return read(diagnostics.protocol, dataset.id, split, int(images), rule).caption


def heatmap(sweep: tuple[str, float] | None) -> None:
    """The heatmap in the chosen view and value and its numbers, re-read from the cache on every
    run; ``sweep`` (variant id, threshold) adds that variant's row at that threshold."""
    table = read(reports.iou_table, dataset.id, split)
    class_images = read(queries.class_image_counts, dataset.id, split)
    if not table.names:
        st.info(f"No variant has label maps on {split} yet.")
        return
    note = truth_note(table)
    if not table.with_truth.any():
        st.info(note)  # no IoU number: none can be computed
        return
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    view = left.radio("Rows", list(VIEWS), format_func=VIEWS.get, horizontal=True, key="view")
    metric = right.selectbox("Value", list(METRIC_NAMES), format_func=METRIC_NAMES.get, key="heatmap_metric",
                             disabled=view == "gain", help="  \n".join(diagnostics.METRICS.values()))
    held = read(diagnostics.undecided, dataset.id, split, tuple(table.variant_ids), dataset.classes.num_classes)
    table, coverage = undecided_rule(table, held, rule)
    if sweep is not None and view != "gain" and sweep[0] in table.variant_ids:
        table, coverage = with_sweep_row(table, coverage, read(diagnostics.sweep_table, dataset.id, split, sweep[0]),
                                         sweep[1])
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
    st.caption(f"{mean_label(metric)} stays the first column. Drag a box to zoom in, double-click to zoom out; "
               "click a cell " + ("to open its images in Pseudo-label QA, most error pixels first." if gain is None
                                  else "to open the images where the refinement lost most on that class."))
    shown_coverage = coverage if rule == "ignore" else None
    if gain is None:
        figure = iou_heatmap(table, class_images, view, columns, metric, shown_coverage)
        cells = [(real_variant(table.variant_ids[r]), None) for r in rows]  # a sweep row opens its variant
    else:
        figure = gain_heatmap(table, gain, class_images, columns)
        cells = [(table.variant_ids[s], table.variant_ids[r]) for r, s in zip(gain.rows, gain.sources)]
    event = st.plotly_chart(figure, key="heatmap", on_select="rerun", selection_mode="points")
    st.caption(_protocol(images_with_truth(table)))
    points = event.selection.points if event else []
    if points:
        st.switch_page("app_pages/qa.py",
                       query_params=cell_link(points[0], columns, cells, dataset.classes, dataset.id, split))
    with st.expander("The numbers"):
        st.dataframe(iou_numbers(table, class_images, columns, "iou" if gain is not None else metric, shown_coverage),
                     hide_index=True)


def _make_variant(variant, what: str, bg_threshold: float | None = None, class_thresholds=()) -> None:
    """Queue ``variant`` again at other thresholds (``threshold_step``): a new row once its job is done."""
    try:
        step = threshold_step(variant, bg_threshold, class_thresholds)
    except ValueError as exc:
        st.error(str(exc))
        return
    queue_chain(dataset.root, split, [step], None, f"the variant at {what} is complete on {split}")


def threshold_section(table: reports.IoUTable) -> tuple[str, float] | None:
    """Pick a swept variant and a grid threshold: its curve, the tuned thresholds and the buttons
    that make variants at them. Returns the heatmap's sweep row (variant id, threshold), None
    while the slider is at the variant's own threshold."""
    swept = [v for v in read(queries.swept_variants, dataset.id) if v in table.variant_ids]
    if not swept:
        st.caption(f"No variant on {split} has a threshold sweep: CAM and ISIM CAM made by the current worker "
                   "record one (their labels at every background threshold of a grid).")
        return None
    names = dict(zip(table.variant_ids, row_labels(table)))
    if st.session_state.get("sweep_variant") not in swept:  # a variant of another dataset or split
        st.session_state.pop("sweep_variant", None)
    variant_id = st.selectbox("Swept variant", swept, format_func=names.get, key="sweep_variant")
    sweep = read(diagnostics.sweep_table, dataset.id, split, variant_id)
    if sweep is None:
        st.info(f"{names[variant_id]} has no sweep rows on {split} (no image with ground truth).")
        return None
    variant = read(queries.get_variant, variant_id)
    own = variant.params.get("bg_threshold")
    grid = sweep.thresholds.tolist()
    start = nearest(grid, own)
    threshold = st.select_slider("Background threshold", grid, value=start, format_func="{:.2f}".format,
                                 key=f"sweep_threshold.{variant_id}")
    per_class = bool(variant.params.get("class_thresholds"))
    row = None if own is not None and abs(threshold - own) < 1e-9 and not per_class else (variant_id, threshold)
    st.caption(("No own threshold" if own is None else f"Own threshold {own:.2f}")
               + ("" if own is None or start == own else f" (nearest grid value {start:.2f})")
               + (", with per-class thresholds" if per_class else "") + ". "
               + ("Move the slider: " if row is None else f"At {threshold:.2f}: ")
               + "the heatmap gets a row “<variant> @ threshold (sweep)” under the variant, its labels at the "
               "slider's threshold as the worker counted them (no job).")
    st.plotly_chart(sweep_chart(sweep, own, threshold), key="sweep_chart")
    st.caption(_protocol(images_with_truth(table, variant_id)))
    if st.button("Make a variant at this threshold", key="sweep_make"):
        _make_variant(variant, f"{threshold:.2f}", bg_threshold=threshold)

    st.markdown("**Per-class thresholds**: chosen on a selection subset, scored on the rest (report), "
                "as an ISLE assignment: the gap shows how much tuning on ground truth flatters.")
    left, right = st.columns(2)
    fraction = left.slider("Fraction of images that select", 0.05, 0.95, 0.5, step=0.05, key="sweep_fraction")
    seed = int(right.number_input("Seed", min_value=0, value=0, step=1, key="sweep_seed"))
    selection_ids, report_ids = Subset(fraction, seed).split(read(queries.usable_image_ids, dataset.id, split))
    selection = read(diagnostics.sweep_table, dataset.id, split, variant_id, tuple(selection_ids))
    report = read(diagnostics.sweep_table, dataset.id, split, variant_id, tuple(report_ids))
    if selection is None or report is None:
        st.info(f"The {'selection' if selection is None else 'report'} subset has no image with ground truth: "
                "change the fraction or the seed.")
        return row
    tuned = diagnostics.tune(selection, report, start)
    st.dataframe(tune_rows(tuned, selection), hide_index=True, key="sweep_tune")
    st.caption(f"{_protocol(images_with_truth(table, variant_id))}; of the split's usable images, selection "
               f"{len(selection_ids):,} images, report {len(report_ids):,} (seed {seed}); default = the variant's own "
               "threshold (or the nearest on the grid); classes without a selection image take the best uniform one.")
    with st.expander("The per-class thresholds"):
        st.dataframe(class_threshold_rows(tuned, selection, report), hide_index=True, key="sweep_classes")
    if st.button("Make a variant at these per-class thresholds", key="sweep_make_per_class"):
        _make_variant(variant, "the per-class thresholds", class_thresholds=object_thresholds(tuned))
    return row


def confusion_section(table: reports.IoUTable) -> None:
    """A variant's class confusion matrix; a click on a cell opens its images in Pseudo-label QA."""
    confused = [v for v in read(queries.confused_variants, dataset.id) if v in table.variant_ids]
    if not confused:
        st.caption(f"No variant on {split} has confusion rows (variants recorded before schema 8 have none).")
        return
    names = dict(zip(table.variant_ids, row_labels(table)))
    if st.session_state.get("confusion_variant") not in confused:
        st.session_state.pop("confusion_variant", None)
    left, middle, right = st.columns([3, 2, 2], vertical_alignment="bottom")
    variant_id = left.selectbox("Variant", confused, format_func=names.get, key="confusion_variant")
    cells = middle.radio("Cells", list(CELLS), format_func=CELLS.get, horizontal=True, key="confusion_cells")
    hide = right.toggle("Only classes with pixels", value=True, key="confusion_hide_empty")
    matrix = read(diagnostics.confusion_matrix, dataset.id, split, variant_id)
    if matrix is None:
        st.info(f"{names[variant_id]} has no confusion rows.")
        return
    rows, columns = confusion_cells(matrix, rule, hide)
    if not rows:
        st.info(f"{names[variant_id]} has no ground-truth pixel on {split}.")
        return
    st.caption("Rows: ground truth; columns: what the variant labelled it"
               + (", “undecided (255)” last" if rule == "miss" else " (undecided pixels left out)")
               + ". Click a cell to open the images with most of those pixels in Pseudo-label QA.")
    event = st.plotly_chart(confusion_heatmap(matrix, rows, columns, rule, cells == "share"), key="confusion",
                            on_select="rerun", selection_mode="points")
    st.caption(_protocol(images_with_truth(table, variant_id)))
    points = event.selection.points if event else []
    if points:
        st.switch_page("app_pages/qa.py", query_params=confusion_link(points[0], rows, columns, dataset.classes,
                                                                      dataset.id, split, variant_id))
    with st.expander("The confusion numbers"):
        st.dataframe(confusion_numbers(matrix, rows, columns, rule, cells == "share"), hide_index=True,
                     key="confusion_numbers")


# Filled after the sections below, so that a chain queued by this very run already makes it live
# and the heatmap shows the threshold picked below.
heatmap_slot = st.container()

table = read(reports.iou_table, dataset.id, split)
st.subheader("Background threshold")
sweep_row = threshold_section(table) if table.names else None

st.subheader("Class confusion")
if table.names:
    confusion_section(table)

st.subheader("Refine a variant")
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
    st.fragment(run_every=3 if has_active_jobs(dataset.id) else None)(heatmap)(sweep_row)
