"""The diagnostics on the Per-class IoU page, driven by AppTest over a cache the real worker filled
(tiny CAM and CAM → dCRF on 8 real VOC train images): the value selector, the predicted-255
rule with coverage, the background-threshold slider and its sweep row, the tuned thresholds, the
buttons that queue variants at them, and the class confusion matrix with its link into QA.

Every number shown is compared with the engine's own (``cache.diagnostics``) on the same cache.
One more variant is imported so that the 255 rule has something to change: "GT stripes", the
ground truth with every fourth row labelled 255 (undecided). Worked out by hand: ignoring its
undecided pixels, every class it labels has IoU exactly 100 %, and its coverage is the share of
ground-truth pixels off those rows. The dCRF variant's confusion rows are deleted, as for a
variant recorded before schema 8: its coverage is "unknown".
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import plotly.io
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cache import diagnostics, queries, reports
from cache.classes import IGNORE_INDEX, VOC
from cache.db import connect
from cache.labelmaps import write_label_map
from engine.core.chains import dataset_id_for
from engine.isle.numerics import Subset
from tests.conftest import REPO
from ui.charts import CONFUSION_TARGETS, confusion_cells, confusion_heatmap, confusion_link

STRIPES = "GT stripes"
MAIN = sys.modules["__main__"]


def _stripes(mask: np.ndarray) -> np.ndarray:
    """The ground truth (GT 255 read as background) with rows 0, 4, 8, ... undecided (255)."""
    label = np.where(mask == IGNORE_INDEX, 0, mask).astype(np.uint8)
    label[::4] = IGNORE_INDEX
    return label


@pytest.fixture(scope="module")
def diag_cache(baseline_cache, tmp_path_factory):
    """``(cache_dir, root, {"cam", "dcrf", "stripes": variant id})``: a copy of the baseline cache
    with "GT stripes" imported, and no confusion rows for CAM → dCRF."""
    from engine.methods.imported import import_step
    from engine.runtime.jobs import submit_chain
    from engine.runtime.worker import WorkerConfig, serve

    cache_dir, root = baseline_cache
    base = tmp_path_factory.mktemp("diagnostics_page")
    copy = base / "cache"
    shutil.copytree(cache_dir, copy)
    folder = base / "stripes"
    folder.mkdir()
    for image_id in (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        mask = np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        write_label_map(folder / f"{image_id}.png", _stripes(mask))
    submit_chain(copy, root, "train", [import_step(folder, STRIPES)])
    serve(WorkerConfig(copy, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(copy) as con:
        variants = queries.variants(con, dataset_id_for(root))
        ids = {"cam": next(v.id for v in variants if v.step == "cam"),
               "dcrf": next(v.id for v in variants if v.step == "dcrf"),
               "stripes": next(v.id for v in variants if v.name == STRIPES)}
        con.execute("DELETE FROM confusion WHERE variant_id = ?", [ids["dcrf"]])
    return copy, root, ids


@pytest.fixture
def env(diag_cache, monkeypatch):
    cache_dir, root, ids = diag_cache
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    # AppTest runs the page as __main__; restore it, or later spawned worker processes would
    # re-run the page script as their main module.
    monkeypatch.setitem(sys.modules, "__main__", MAIN)
    return cache_dir, dataset_id_for(root), ids


def _page() -> AppTest:
    return AppTest.from_file(str(REPO / "app_pages" / "per_class_iou.py"), default_timeout=60).run()


def _typed(value) -> np.ndarray:
    """Plotly 7 sends numpy arrays as ``{"dtype", "bdata" (base64), "shape"}``."""
    if isinstance(value, dict):
        shape = tuple(int(n) for n in value["shape"].split(","))
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.array(value, dtype=float)


def _chart(at: AppTest, key: str):
    """The plotly figure of the chart with widget key ``key``."""
    chart = next(c for c in at.get("plotly_chart") if c.proto.id.endswith(key) or key in c.proto.id)
    return plotly.io.from_json(chart.proto.spec)


def _heatmap(at: AppTest):
    return plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)  # the heatmap is the page's first chart


def _frame(at: AppTest, column: str):
    """The first dataframe with ``column``."""
    return next(f.value for f in at.dataframe if column in f.value.columns)


def _numbers(at: AppTest):
    return _frame(at, "with ground truth").set_index("variant")


def _read(cache_dir: Path, fn, *args):
    with connect(cache_dir, read_only=True) as con:
        return fn(con, *args)


def _shown(table: reports.IoUTable, images: dict[int, int]) -> list[int]:
    return [c for c in range(table.classes.num_classes) if images.get(c)]


def _row(table: reports.IoUTable, variant_id: str) -> int:
    return table.variant_ids.index(variant_id)


def _rounded(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(100 * float(v), 2) for v in values]


def _as_list(series) -> list[float | None]:
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in series]


def _protocols(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith("protocol:")]


# --- the value selector ------------------------------------------------------------------------


def test_precision_shows_the_engines_metric_values(env):
    cache_dir, dataset_id, ids = env
    at = _page()
    assert not at.exception
    table = _read(cache_dir, reports.iou_table, dataset_id, "train")
    images = _read(cache_dir, queries.class_image_counts, dataset_id, "train")
    shown = _shown(table, images)
    heat = _heatmap(at)
    assert np.allclose(_typed(heat.data[0].z), table.iou[:, shown] * 100, equal_nan=True)  # IoU by default
    assert heat.data[1].x == ("mIoU",) and "mIoU" in _numbers(at).columns

    at.selectbox(key="heatmap_metric").set_value("precision").run()
    assert not at.exception
    heat = _heatmap(at)
    precision = np.where(table.n_images > 0,
                         diagnostics.metric_values(table.tp, table.fp, table.fn, "precision"), np.nan)
    assert not np.allclose(precision, table.iou, equal_nan=True)
    assert np.allclose(_typed(heat.data[0].z), precision[:, shown] * 100, equal_nan=True)
    mean = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in precision])
    assert heat.data[1].x == ("mean precision",)
    assert np.allclose(_typed(heat.data[1].z)[:, 0], mean * 100, equal_nan=True)
    assert heat.layout.coloraxis.colorbar.title.text == "precision %"
    numbers = _numbers(at)
    assert "mIoU" not in numbers.columns
    for v, name in enumerate(numbers.index):
        assert _as_list(numbers.loc[name, [c for c in numbers.columns if c.rsplit(" (", 1)[0] in
                                           [VOC.name(k) for k in shown]]]) == _rounded(precision[v, shown])
        assert _as_list([numbers.loc[name, "mean precision"]]) == _rounded(mean[v:v + 1])
    # Every cell's hover gives all five figures, the pixels and the images.
    hover = heat.data[2].hovertext[shown.index(next(c for c in shown if c > 0))]
    for word in ("IoU", "precision", "recall", "FP share", "FN share", "TP ", "FP ", "FN ", "image(s) with"):
        assert word in hover

    # FN share: an error share, coloured reversed (low is good, as a high IoU).
    scale = heat.layout.coloraxis.colorscale
    at.selectbox(key="heatmap_metric").set_value("fn share").run()
    heat = _heatmap(at)
    fn_share = diagnostics.metric_values(table.tp, table.fp, table.fn, "fn share")
    assert np.allclose(_typed(heat.data[0].z), np.where(table.n_images > 0, fn_share, np.nan)[:, shown] * 100,
                       equal_nan=True)
    assert heat.layout.coloraxis.colorscale[0][1] == scale[-1][1]
    assert heat.data[1].x == ("mean FN share",)


# --- the predicted-255 rule -------------------------------------------------------------------


def test_ignoring_undecided_pixels_takes_them_out_of_fn_and_shows_coverage(env):
    cache_dir, dataset_id, ids = env
    at = _page()
    table = _read(cache_dir, reports.iou_table, dataset_id, "train")
    held = _read(cache_dir, diagnostics.undecided, dataset_id, "train", table.variant_ids, VOC.num_classes)
    stripes, dcrf = _row(table, ids["stripes"]), _row(table, ids["dcrf"])
    assert held.pixels[stripes].sum() > 0 and not held.known[dcrf]
    images = _read(cache_dir, queries.class_image_counts, dataset_id, "train")
    shown = _shown(table, images)
    labelled = [c for c in shown if table.tp[stripes, c] > 0]
    # Counted as a miss (the default): the stripes row is today's IoU, below 100 %.
    assert "predicted 255 counted as a miss" in _protocols(at)[0]
    assert "coverage" not in _numbers(at).columns
    assert (table.iou[stripes, labelled] < 1).all()

    at.radio(key="undecided").set_value("ignore").run()
    assert not at.exception
    tp, fp, fn, coverage = diagnostics.apply_undecided(table.tp, table.fp, table.fn, held.pixels, "ignore")
    assert (fn[stripes] < table.fn[stripes]).any()
    iou = np.where(table.n_images > 0, diagnostics.metric_values(tp, fp, fn, "iou"), np.nan)
    iou[dcrf] = table.iou[dcrf]  # unknown undecided pixels: its counts stay as stored
    heat = _heatmap(at)
    assert np.allclose(_typed(heat.data[0].z), iou[:, shown] * 100, equal_nan=True)
    assert np.allclose(_typed(heat.data[0].z)[stripes, [shown.index(c) for c in labelled]], 100.0)  # by hand
    numbers = _numbers(at)
    row_names = list(numbers.index)
    assert numbers.loc[row_names[stripes], "coverage"] == f"{100 * coverage[stripes]:.2f}%"
    assert 0.6 < coverage[stripes] < 0.9  # a quarter of the rows undecided
    assert numbers.loc[row_names[dcrf], "coverage"] == "unknown"
    assert numbers.loc[row_names[_row(table, ids["cam"])], "coverage"] == "100.00%"  # a CAM decides every pixel
    assert heat.data[0].y[stripes].endswith(f"coverage {100 * coverage[stripes]:.2f}%")
    assert heat.data[0].y[dcrf].endswith("coverage unknown")
    assert all("predicted 255 ignored" in p for p in _protocols(at))


# --- the background threshold --------------------------------------------------------------------


def test_the_slider_redraws_the_sweep_row_at_the_engines_counts(env):
    cache_dir, dataset_id, ids = env
    cam = ids["cam"]
    at = _page()
    assert not at.exception
    table = _read(cache_dir, reports.iou_table, dataset_id, "train")
    sweep = _read(cache_dir, diagnostics.sweep_table, dataset_id, "train", cam)
    images = _read(cache_dir, queries.class_image_counts, dataset_id, "train")
    shown = _shown(table, images)
    slider = at.select_slider(key=f"sweep_threshold.{cam}")
    assert slider.value == 0.3 and list(slider.options) == [f"{t:.2f}" for t in sweep.thresholds]
    assert len(_heatmap(at).data[0].y) == len(table.names)  # at its own threshold: no sweep row
    # The curve: mIoU at every threshold, then a line per class with images.
    curve = _chart(at, "sweep_chart")
    assert np.allclose(_typed(curve.data[0].y), sweep.miou * 100)
    assert [d.name for d in curve.data[1:]] == [VOC.name(c) for c in np.flatnonzero(sweep.has_class)]

    before = None
    for threshold in (0.25, 0.45):
        at.select_slider(key=f"sweep_threshold.{cam}").set_value(threshold).run()
        assert not at.exception
        j = sweep.thresholds.tolist().index(threshold)
        iou = sweep.metric("iou")[j]
        heat = _heatmap(at)
        row = _row(table, cam) + 1  # right under its variant
        assert heat.data[0].y[row].split(" · ")[0].endswith(f" @ {threshold:.2f} (sweep)")
        assert np.allclose(_typed(heat.data[0].z)[row], iou[shown] * 100, equal_nan=True)
        assert np.isclose(_typed(heat.data[1].z)[row, 0], sweep.miou[j] * 100)
        numbers = _numbers(at)
        name = numbers.index[row]
        assert name.endswith(f" @ {threshold:.2f} (sweep)")
        assert _as_list(numbers.loc[name, numbers.columns[3:]]) == _rounded(iou[shown])
        assert numbers.loc[name, "mIoU"] == round(100 * sweep.miou[j], 2)
        assert before is None or not np.allclose(before, iou[shown], equal_nan=True)
        before = iou[shown]
    at.select_slider(key=f"sweep_threshold.{cam}").set_value(0.3).run()
    assert len(_heatmap(at).data[0].y) == len(table.names)


def test_the_tune_table_shows_the_engines_tuned_thresholds(env):
    cache_dir, dataset_id, ids = env
    cam = ids["cam"]
    at = _page()
    for seed in (0, 3):
        at.number_input(key="sweep_seed").set_value(seed).run()
        assert not at.exception
        usable = _read(cache_dir, queries.usable_image_ids, dataset_id, "train")
        selection_ids, report_ids = Subset(0.5, seed).split(usable)
        selection = _read(cache_dir, diagnostics.sweep_table, dataset_id, "train", cam, selection_ids)
        report = _read(cache_dir, diagnostics.sweep_table, dataset_id, "train", cam, report_ids)
        tuned = diagnostics.tune(selection, report, 0.3)
        shown = _frame(at, "selection mIoU")
        assert list(shown["threshold"]) == ["default", "best uniform", "per class"]
        assert list(shown["value"][:2]) == ["0.30", f"{selection.thresholds[tuned.uniform]:.2f}"]
        assert _as_list(shown["selection mIoU"]) == _rounded(tuned.selection_miou)
        assert _as_list(shown["report mIoU"]) == _rounded(tuned.report_miou)
        assert _as_list(shown["selection − report"]) == _rounded(tuned.selection_miou - tuned.report_miou)
        per_class = _frame(at, "report IoU, tuned")
        objects = [c for c in np.flatnonzero(selection.has_class) if c > 0]
        assert list(per_class["class"]) == [VOC.name(c) for c in objects]
        assert list(per_class["threshold"]) == [round(float(tuned.thresholds[c]), 2) for c in objects]
        assert _as_list(per_class["report IoU, tuned"]) == _rounded(tuned.report_iou[2, objects])
        assert any(f"selection {len(selection_ids)} images, report {len(report_ids)}" in p for p in _protocols(at))


def _jobs(cache_dir: Path) -> list[tuple]:
    with connect(cache_dir, read_only=True) as con:
        return con.execute("""SELECT j.id, j.status, v.step, v.params, v.source_id FROM jobs j
                              LEFT JOIN variants v ON v.id = j.variant_id ORDER BY j.id""").fetchall()


def test_make_a_variant_at_the_threshold_and_at_the_per_class_ones(env, tmp_path, monkeypatch):
    source, dataset_id, ids = env
    cache_dir = tmp_path / "cache"
    shutil.copytree(source, cache_dir)
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    cam = ids["cam"]
    before = _jobs(cache_dir)
    at = _page()
    at.select_slider(key=f"sweep_threshold.{cam}").set_value(0.25).run()
    at.button(key="sweep_make").click().run()
    assert not at.exception
    jobs = _jobs(cache_dir)
    assert len(jobs) == len(before) + 1
    _, status, step, params, source_id = jobs[-1]
    params = json.loads(params)
    own = _read(cache_dir, queries.get_variant, cam).params
    assert (status, step, source_id) == ("queued", "cam", None)
    assert params == {**own, "bg_threshold": 0.25, "class_thresholds": []}  # only the threshold changed
    assert at.toast[0].value == f"Queued jobs [{jobs[-1][0]}]"

    at.button(key="sweep_make_per_class").click().run()
    assert not at.exception
    usable = _read(cache_dir, queries.usable_image_ids, dataset_id, "train")
    selection_ids, report_ids = Subset(0.5, 0).split(usable)
    tuned = diagnostics.tune(_read(cache_dir, diagnostics.sweep_table, dataset_id, "train", cam, selection_ids),
                             _read(cache_dir, diagnostics.sweep_table, dataset_id, "train", cam, report_ids), 0.3)
    jobs = _jobs(cache_dir)
    assert len(jobs) == len(before) + 2
    params = json.loads(jobs[-1][3])
    assert params["class_thresholds"] == tuned.thresholds[1:].tolist() and len(params["class_thresholds"]) == 20
    assert params["bg_threshold"] == own["bg_threshold"]
    at.button(key="sweep_make").click().run()  # the same variant again: its job is reused
    assert len(_jobs(cache_dir)) == len(before) + 2


# --- the class confusion ------------------------------------------------------------------------


def test_the_confusion_matrix_shows_the_engines_numbers(env):
    cache_dir, dataset_id, ids = env
    at = _page()
    select = at.selectbox(key="confusion_variant")
    assert ids["dcrf"] not in select.options and select.value == ids["cam"]  # no confusion rows: not offered
    matrix = _read(cache_dir, diagnostics.confusion_matrix, dataset_id, "train", ids["cam"])
    rows = [c for c in range(VOC.num_classes) if matrix.pixels[c].sum()]
    columns = [c for c in range(VOC.num_classes) if matrix.pixels[:, c].sum()] + [VOC.num_classes]
    figure = _chart(at, "confusion")
    assert list(figure.data[0].y) == [VOC.name(c) for c in rows]
    assert list(figure.data[0].x) == [VOC.name(c) for c in columns[:-1]] + ["undecided (255)"]
    cells = _typed(figure.data[0].customdata)
    assert np.array_equal(cells[..., 0], matrix.pixels[np.ix_(rows, columns)])
    assert np.allclose(cells[..., 1], matrix.normalised()[np.ix_(rows, columns)], equal_nan=True)
    assert np.array_equal(cells[..., 2], matrix.images[np.ix_(rows, columns)])
    numbers = _frame(at, "ground truth").set_index("ground truth")
    assert numbers.to_numpy().tolist() == matrix.pixels[np.ix_(rows, columns)].tolist()
    # Its rows sum to the variant's counts: TP on the diagonal, FN the rest of the row.
    table = _read(cache_dir, reports.iou_table, dataset_id, "train")
    cam = _row(table, ids["cam"])
    assert np.array_equal(matrix.counts(), np.stack([table.tp[cam], table.fp[cam], table.fn[cam]], axis=1))

    at.radio(key="confusion_cells").set_value("share").run()
    numbers = _frame(at, "ground truth").set_index("ground truth")
    assert _as_list(numbers.to_numpy().ravel()) == _rounded(matrix.normalised()[np.ix_(rows, columns)].ravel())
    assert np.allclose(_typed(_chart(at, "confusion").data[0].z), matrix.normalised()[np.ix_(rows, columns)] * 100)

    # The stripes variant: its undecided column is a quarter of every row; ignored, it is left out.
    at.selectbox(key="confusion_variant").set_value(ids["stripes"]).run()
    stripes = _read(cache_dir, diagnostics.confusion_matrix, dataset_id, "train", ids["stripes"])
    figure = _chart(at, "confusion")
    assert figure.data[0].x[-1] == "undecided (255)"
    assert np.allclose(_typed(figure.data[0].customdata)[:, -1, 0], stripes.pixels[[VOC.index(n) for n in
                                                                                    figure.data[0].y], -1])
    at.radio(key="undecided").set_value("ignore").run()
    figure = _chart(at, "confusion")
    assert "undecided (255)" not in figure.data[0].x
    shares = _typed(figure.data[0].z) / 100
    assert np.allclose(np.nansum(shares, axis=1), 1.0)  # rows of decided pixels
    assert np.allclose(np.diag(shares), 1.0)  # by hand: every decided pixel is its true class
    assert "predicted 255 ignored" in _protocols(at)[-1]


def test_a_confusion_cell_links_to_its_images_in_qa(env):
    cache_dir, dataset_id, ids = env
    matrix = _read(cache_dir, diagnostics.confusion_matrix, dataset_id, "train", ids["cam"])
    rows, columns = confusion_cells(matrix, "miss")
    figure = confusion_heatmap(matrix, rows, columns, "miss", normalised=False)
    targets = figure.data[CONFUSION_TARGETS]
    for r, k in ((0, 0), (1, 0), (len(rows) - 1, len(columns) - 1)):
        index = r * len(columns) + k
        assert (targets.y[index], targets.x[index]) == (VOC.name(rows[r]), matrix.column_label(columns[k]))
        link = confusion_link({"curve_number": CONFUSION_TARGETS, "point_index": index}, rows, columns, VOC,
                              dataset_id, "train", ids["cam"])
        predicted = "undecided" if columns[k] == VOC.num_classes else VOC.name(columns[k])
        assert link == {"dataset": dataset_id, "split": "train", "variant": ids["cam"], "sort": "confusion",
                        "class": VOC.name(rows[r]), "as": predicted}
        assert f"{matrix.pixels[rows[r], columns[k]]:,} px" in targets.hovertext[index]
    with pytest.raises(ValueError):
        confusion_link({"curve_number": 0, "point_index": 0}, rows, columns, VOC, dataset_id, "train", ids["cam"])


def test_clicking_a_confusion_cell_opens_qa_sorted_by_that_confusion(env):
    """Through app.py's router: the selection Plotly sends for a click on (cat, background)."""
    from streamlit.util import AttributeDictionary

    cache_dir, dataset_id, ids = env
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/per_class_iou.py").run()
    assert not at.exception
    matrix = _read(cache_dir, diagnostics.confusion_matrix, dataset_id, "train", ids["cam"])
    rows, columns = confusion_cells(matrix, "miss")
    cat = VOC.index("cat")
    index = rows.index(cat) * len(columns) + columns.index(0)
    at.session_state["confusion"] = AttributeDictionary({"selection": AttributeDictionary(
        {"points": [{"curve_number": CONFUSION_TARGETS, "point_index": index}], "point_indices": [index],
         "box": [], "lasso": []})})
    at.run()
    assert not at.exception and at.title[0].value == "Pseudo-label QA"
    assert dict(at.query_params) == {"dataset": dataset_id, "split": "train", "variant": ids["cam"],
                                     "sort": "confusion", "class": "cat", "as": "background"}
    assert at.selectbox(key="qa_sort").value == "confusion"


# --- the page helpers on cases worked out by hand ------------------------------------------------


def _hand_table() -> reports.IoUTable:
    """Two variants, 3 classes (VOC's first three), class 2 without images: variant "a" has
    class 1 with TP 6, FP 2, FN 2 (IoU 0.6, precision 0.75, recall 0.75, FP share 0.2), and
    never predicts class 0 (TP 0, FP 0, FN 4: precision undefined)."""
    from cache.classes import ClassSet

    classes = ClassSet(VOC.names[:3])
    tp = np.array([[0, 6, 0], [3, 8, 0]], np.int64)
    fp = np.array([[0, 2, 0], [1, 0, 0]], np.int64)
    fn = np.array([[4, 2, 0], [1, 0, 0]], np.int64)
    n_images = np.array([[2, 2, 0], [2, 2, 0]], np.int64)
    blank = reports.IoUTable(classes=classes, variant_ids=["a", "b"], names=["A", "B"], source_ids=[None, None],
                             labelled=np.array([2, 2]), with_truth=np.array([2, 2]), iou=np.zeros((2, 3)),
                             tp=tp, fp=fp, fn=fn, n_images=n_images, miou=np.zeros(2))
    return reports.recount(blank, tp, fp, fn)


def test_metric_table_undecided_rule_and_sweep_row_by_hand():
    from ui.charts import metric_table, undecided_rule, with_sweep_row

    table = _hand_table()
    assert np.allclose(table.iou[0], [0.0, 0.6, np.nan], equal_nan=True) and np.isclose(table.miou[0], 0.3)
    values, means, n = metric_table(table, "precision")
    assert np.allclose(values[0], [np.nan, 0.75, np.nan], equal_nan=True) and means[0] == 0.75 and n[0] == 1
    assert np.allclose(metric_table(table, "fp share")[0][0], [0.0, 0.2, np.nan], equal_nan=True)

    # Variant "b" left its 1 missed pixel of class 0 undecided: ignored, class 0 becomes TP 3,
    # FP 1, FN 0, IoU 3/4. Variant "a"'s undecided pixels are unknown: its counts stay.
    held = diagnostics.Undecided(pixels=np.array([[4, 0, 0], [1, 0, 0]]), known=np.array([False, True]))
    ruled, coverage = undecided_rule(table, held, "ignore")
    assert ruled.fn.tolist() == [[4, 2, 0], [0, 0, 0]] and np.isclose(ruled.iou[1, 0], 0.75)
    assert np.isnan(coverage[0]) and np.isclose(coverage[1], 1 - 1 / 12)  # 12 ground-truth pixels, 1 undecided
    same, _ = undecided_rule(table, held, "miss")
    assert same.fn.tolist() == table.fn.tolist()

    # A sweep row of "a" at 0.25: TP 8, FP 4, FN 0 on class 1 -> IoU 2/3, right under "a".
    counts = np.zeros((2, 3, 4), np.int64)
    counts[1] = [[2, 0, 2, 0], [8, 4, 0, 2], [0, 0, 0, 0]]
    sweep = diagnostics.SweepTable("a", table.classes, np.array([0.2, 0.25]), counts, np.array([2, 2, 0]), 4, 8)
    grown, cover = with_sweep_row(table, np.array([0.9, 0.8]), sweep, 0.25)
    assert grown.variant_ids == ["a", "a@0.25", "b"] and grown.names[1] == "A @ 0.25 (sweep)"
    assert grown.source_ids[1] == "a" and np.allclose(grown.iou[1], [0.5, 2 / 3, np.nan], equal_nan=True)
    assert cover.tolist() == [0.9, 1.0, 0.8]
    with pytest.raises(ValueError):
        with_sweep_row(table, np.array([0.9, 0.8]), sweep, 0.3)


def test_confusion_shares_and_cells_by_hand():
    from cache.classes import ClassSet
    from ui.charts import confusion_numbers, confusion_shares

    classes = ClassSet(VOC.names[:3])
    # gt 0: 6 right, 2 undecided; gt 1: 3 as 0, 1 right; gt 2: nothing.
    pixels = np.array([[6, 0, 0, 2], [3, 1, 0, 0], [0, 0, 0, 0]], np.int64)
    matrix = diagnostics.ConfusionMatrix("a", classes, pixels, (pixels > 0).astype(np.int64))
    assert np.allclose(confusion_shares(matrix, "miss")[:2], [[0.75, 0, 0, 0.25], [0.75, 0.25, 0, 0]])
    assert np.allclose(confusion_shares(matrix, "ignore")[:2], [[1.0, 0, 0], [0.75, 0.25, 0]])
    assert confusion_cells(matrix, "miss") == ([0, 1], [0, 1, 3])
    assert confusion_cells(matrix, "ignore") == ([0, 1], [0, 1])
    assert confusion_cells(matrix, "miss", hide_empty=False) == ([0, 1, 2], [0, 1, 2, 3])
    assert confusion_numbers(matrix, [0, 1], [0, 1, 3], "miss", normalised=False) == [
        {"ground truth": "background", "background": 6, "aeroplane": 0, "undecided (255)": 2},
        {"ground truth": "aeroplane", "background": 3, "aeroplane": 1, "undecided (255)": 0}]
    link = confusion_link({"curve_number": CONFUSION_TARGETS, "point_index": 2}, [0, 1], [0, 1, 3], classes,
                          "d", "train", "a")
    assert (link["class"], link["as"]) == ("background", "undecided")
