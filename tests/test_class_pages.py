"""The pages with the class set as data: one cache holding a VOC dataset (21 classes) and a COCO
2014 one (81 classes), built by hand with ``cache.queries`` from real images and masks of
/work/shared/data. The heatmap's columns, sorting, hiding and frozen mIoU; the click mapping back
through the shown columns; "no ground truth" instead of numbers; the QA class pickers, filters and
overlays of the picked dataset; switching datasets.

The label maps are the real masks shifted sideways (``SHIFTS``): real shapes, IoU below 1, and a
refinement that differs from its source.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import numpy as np
import plotly.io
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cache import queries, reports
from cache.classes import VOC, ClassSet, read_classes_txt
from cache.db import connect
from cache.labelmaps import read_label_map, write_label_map
from cache.rows import Variant
from engine.core.chains import dataset_id_for
from engine.ops.metrics import confusion_counts, iou_from_counts
from tests.conftest import REPO, VOC_ROOT
from ui.charts import CLASS_TARGETS, MIOU_TARGETS, cell_link, clicked_cell, column_order, iou_heatmap

COCO_ROOT = (REPO / ".." / "shared" / "data" / "coco2014-mini").resolve()
COCO = read_classes_txt(COCO_ROOT / "classes.txt")
VOC_ID, COCO_ID = dataset_id_for(VOC_ROOT), dataset_id_for(COCO_ROOT)
SHIFTS = {"cam": 24, "dcrf": 6}  # px the variant's label map is shifted right from the mask
MAIN = sys.modules["__main__"]


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _label(mask: np.ndarray, step: str) -> np.ndarray:
    """A variant's label map: the mask shifted right by ``SHIFTS[step]``, background entering on the left."""
    shift = SHIFTS[step]
    out = np.zeros_like(mask)
    out[:, shift:] = mask[:, :-shift]
    out[out == 255] = 0
    return out


def _objects(mask: np.ndarray, classes: ClassSet) -> list[int]:
    return [int(c) for c in np.unique(mask) if c in classes.foreground]


def _register(con, cache_dir: Path, dataset_id: str, root: Path, classes: ClassSet, layout: str,
              splits: dict[str, list[tuple[str, Path, Path | None, Path]]]) -> dict[str, str]:
    """One dataset with its splits (``{split: [(image id, image, mask or None, the mask the label
    maps come from)]}``) and two variants, CAM and CAM → dCRF, labelling every image; counts only
    for images registered with a mask, as the worker records them. Returns ``{step: variant id}``."""
    queries.upsert_dataset(con, dataset_id, root.name, str(root), classes, layout)
    masks = {}
    for split, images in splits.items():
        rows = []
        for image_id, image, mask, source in images:
            truth = _mask(source)
            masks[image_id] = (truth if mask is not None else None, truth)
            rows.append((image_id, str(image), None if mask is None else str(mask), *truth.shape,
                         _objects(truth, classes), None))
        queries.replace_split_images(con, dataset_id, split, rows)
    queries.mark_scanned(con, dataset_id)
    ids = {}
    for k, step in enumerate(("cam", "dcrf")):
        vid = f"{dataset_id[:6]}-{step}"
        chain = ({"name": "cam", "params": {}},) + (({"name": "dcrf", "params": {}},) if step == "dcrf" else ())
        queries.insert_variant(con, Variant(
            id=vid, dataset_id=dataset_id, name="CAM" if step == "cam" else "CAM → dCRF", method="cam", step=step,
            params={}, steps=chain, source_id=ids.get("cam"), code_version="test", created_at=float(k)))
        maps, counts = [], []
        for image_id, (truth, source) in masks.items():
            label = _label(source, step)
            path = Path("labels") / vid / f"{image_id}.png"
            write_label_map(cache_dir / path, label, classes)
            maps.append((image_id, str(path), None))
            if truth is not None:
                for class_id, (tp, fp, fn) in enumerate(confusion_counts(truth, label, classes.num_classes).tolist()):
                    if tp or fp or fn:
                        counts.append((image_id, class_id, tp, fp, fn))
        queries.record_results(con, 0, vid, queries.ResultRows(maps, counts, []))
        ids[step] = vid
    return ids


def _voc(image_id: str) -> tuple[str, Path, Path, Path]:
    mask = VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png"
    return image_id, VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", mask, mask


def _coco(name: str, with_mask: bool = True) -> tuple[str, Path, Path | None, Path]:
    part = "train2014" if "train" in name else "val2014"
    mask = COCO_ROOT / "SegmentationClass" / part / f"{name}.png"
    return name, COCO_ROOT / "coco2014" / part / f"{name}.jpg", mask if with_mask else None, mask


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """``(cache_dir, {dataset id: {step: variant id}})``: VOC train (6 images) and val (3 images,
    registered without masks); COCO train (10 images with masks), val (6 without: image-level
    labels only) and trainval (the two together: 10 of 16 with ground truth)."""
    cache_dir = tmp_path_factory.mktemp("classes") / "cache"
    voc_ids = (VOC_ROOT / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    voc_val = (VOC_ROOT / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    coco_train = (COCO_ROOT / "lists" / "train.txt").read_text().split()[:10]
    coco_val = (COCO_ROOT / "lists" / "val.txt").read_text().split()[:6]
    with connect(cache_dir) as con:
        variants = {
            VOC_ID: _register(con, cache_dir, VOC_ID, VOC_ROOT, VOC, "vocdevkit", {
                "train": [_voc(i) for i in voc_ids[:6]],
                "val": [(*_voc(i)[:2], None, _voc(i)[3]) for i in voc_val[:3]],
                "trainval": [_voc(i) for i in voc_ids[:6]] + [(*_voc(i)[:2], None, _voc(i)[3]) for i in voc_val[:3]],
            }),
            COCO_ID: _register(con, cache_dir, COCO_ID, COCO_ROOT, COCO, "coco2014", {
                "train": [_coco(n) for n in coco_train],
                "val": [_coco(n, with_mask=False) for n in coco_val],
                "trainval": [_coco(n) for n in coco_train] + [_coco(n, with_mask=False) for n in coco_val],
            }),
        }
    return cache_dir, variants


@pytest.fixture
def env(two_datasets, monkeypatch):
    cache_dir, variants = two_datasets
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(VOC_ROOT))  # the VOC dataset is the picker's default
    monkeypatch.setitem(sys.modules, "__main__", MAIN)
    return cache_dir, variants


def _page(name: str, **params: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app_pages" / name), default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    return at


def _z(trace) -> np.ndarray:
    """A heatmap's z: Plotly 7 sends numpy arrays as ``{"dtype", "bdata" (base64), "shape"}``."""
    value = trace.z
    if isinstance(value, dict):
        shape = tuple(int(n) for n in value["shape"].split(","))
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.array(value, dtype=float)


def _figure(at: AppTest):
    return plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)


def _cache_dir() -> Path:
    return Path(os.environ["ISLE_CACHE_DIR"])


def _pick(at: AppTest, dataset_id: str) -> AppTest:
    """Switch the page's dataset picker to ``dataset_id`` and rerun."""
    with connect(_cache_dir(), read_only=True) as con:
        dataset = queries.get_dataset(con, dataset_id)
    return at.selectbox(key="dataset").set_value(dataset).run()


def _table(dataset_id: str, split: str) -> reports.IoUTable:
    with connect(_cache_dir(), read_only=True) as con:
        return reports.iou_table(con, dataset_id, split)


def _class_images(dataset_id: str, split: str) -> dict[int, int]:
    with connect(_cache_dir(), read_only=True) as con:
        return queries.class_image_counts(con, dataset_id, split)


def _names(labels) -> list[str]:
    """Class names of the column labels ("teddy bear (3)" -> "teddy bear")."""
    return [label.rsplit(" (", 1)[0] for label in labels]


# --- the heatmap --------------------------------------------------------------------------------


def test_heatmap_columns_are_the_picked_datasets_classes(env):
    at = _page("per_class_iou.py").run()
    assert not at.exception
    assert at.selectbox(key="dataset").value.id == VOC_ID and "21 classes" in at.selectbox(key="dataset").options[0]
    figure = _figure(at)
    heat, miou = figure.data[0], figure.data[1]
    voc = _table(VOC_ID, "train")
    present = [c for c in range(VOC.num_classes) if _class_images(VOC_ID, "train").get(c)]
    # Empty classes hidden by default, the rest in label order after the frozen mIoU column.
    assert _names(heat.x) == [VOC.names[c] for c in present] and list(miou.x) == ["mIoU"]
    assert np.allclose(_z(heat), voc.iou[:, present] * 100, equal_nan=True)
    assert np.allclose(_z(miou)[:, 0], voc.miou * 100)
    assert miou.xaxis == "x" and heat.xaxis == "x2"  # mIoU is the left panel, fixed; classes zoom and pan
    assert figure.layout.xaxis.fixedrange and not figure.layout.xaxis2.fixedrange
    hidden = next(c.value for c in at.caption if c.value.startswith("No image of"))
    assert "aeroplane" in hidden and "hidden" in hidden

    # The picker switches to COCO: its class names, 81 columns when the empty ones are shown.
    _pick(at, COCO_ID)
    assert not at.exception
    heat = _figure(at).data[0]
    coco_images = _class_images(COCO_ID, "train")
    assert _names(heat.x) == [COCO.names[c] for c in range(COCO.num_classes) if coco_images.get(c)]
    assert "person" in _names(heat.x) and "aeroplane" not in _names(heat.x)
    at.toggle(key="heatmap_hide_empty").set_value(False).run()
    figure = _figure(at)
    assert _names(figure.data[0].x) == list(COCO.names) and len(figure.data[0].x) == 81
    assert figure.data[0].x[2] == "bicycle (no images)"
    # 81 columns: upright labels, smaller whole-number texts, a chart tall enough for the labels.
    assert figure.layout.xaxis2.tickangle == -90 and figure.data[0].textfont.size < 13
    row = list(_z(figure.data[0])[0])
    shown = [t for t, z in zip(figure.data[0].text[0], row) if np.isfinite(z)]
    assert shown and all("." not in t for t in shown)
    assert figure.layout.margin.t > 100


def test_columns_sort_by_a_rows_iou_by_the_mean_and_by_images(env):
    at = _page("per_class_iou.py").run()
    _pick(at, COCO_ID)
    table, images = _table(COCO_ID, "train"), _class_images(COCO_ID, "train")
    present = [c for c in range(COCO.num_classes) if images.get(c)]
    cam, dcrf = env[1][COCO_ID]["cam"], env[1][COCO_ID]["dcrf"]

    at.selectbox(key="heatmap_sort").set_value("iou_low").run()
    at.selectbox(key="heatmap_by").set_value(cam).run()
    assert not at.exception
    iou = table.iou[table.variant_ids.index(cam)]
    expected = sorted(present, key=lambda c: (np.isnan(iou[c]), 0 if np.isnan(iou[c]) else iou[c], c))
    assert _names(_figure(at).data[0].x) == [COCO.names[c] for c in expected]
    assert np.diff([v for v in iou[expected] if np.isfinite(v)]).min() >= 0

    at.selectbox(key="heatmap_sort").set_value("iou_high").run()
    at.selectbox(key="heatmap_by").set_value("__mean__").run()
    mean = {c: np.nanmean(table.iou[:, c]) for c in present if np.isfinite(table.iou[:, c]).any()}
    order = _names(_figure(at).data[0].x)
    assert order[:len(mean)] == [COCO.names[c] for c in sorted(mean, key=lambda c: (-mean[c], c))]
    assert _figure(at).data[1].x == ("mIoU",)  # the mIoU column is never sorted away

    at.selectbox(key="heatmap_sort").set_value("images").run()
    order = _names(_figure(at).data[0].x)
    counts = [images[COCO.index(name)] for name in order]
    assert counts == sorted(counts, reverse=True)
    assert order[:2] == ["background", "person"] and counts[0] == len(_usable(COCO_ID, "train"))

    # The gain view sorts by the refinement's gain.
    at.radio(key="view").set_value("gain").run()
    at.selectbox(key="heatmap_sort").set_value("iou_low").run()
    at.selectbox(key="heatmap_by").set_value(dcrf).run()
    assert not at.exception
    gain = table.iou[table.variant_ids.index(dcrf)] - iou
    finite = [c for c in present if np.isfinite(gain[c])]
    shown = [COCO.index(n) for n in _names(_figure(at).data[0].x)][:len(finite)]
    assert shown == sorted(finite, key=lambda c: (gain[c], c))


def test_a_click_maps_back_through_the_shown_columns(env):
    table, images = _table(COCO_ID, "train"), _class_images(COCO_ID, "train")
    columns = column_order(table, images, "iou_high", table.variant_ids[0], hide_empty=True)
    assert columns != sorted(columns) and len(columns) < COCO.num_classes  # reordered and hidden
    figure = iou_heatmap(table, images, "flat", columns)
    targets, miou_targets = figure.data[CLASS_TARGETS], figure.data[MIOU_TARGETS]
    cells = [(v, None) for v in table.variant_ids]
    for row in range(len(table.variant_ids)):
        for k in (0, 3, len(columns) - 1):
            index = row * len(columns) + k
            point = {"curve_number": CLASS_TARGETS, "point_index": index}
            assert clicked_cell(point, columns) == (row, columns[k])
            # The point the figure draws there is that class's column of that row.
            assert targets.x[index].rsplit(" (", 1)[0] == COCO.name(columns[k])
            assert targets.y[index] == figure.data[0].y[row]
            link = cell_link(point, columns, cells, COCO, COCO_ID, "train")
            assert link == {"dataset": COCO_ID, "split": "train", "variant": table.variant_ids[row], "sort": "errors",
                            "class": COCO.name(columns[k])}
        point = {"curve_number": MIOU_TARGETS, "point_index": row}
        assert clicked_cell(point, columns) == (row, None) and miou_targets.x[row] == "mIoU"
        assert "class" not in cell_link(point, columns, cells, COCO, COCO_ID, "train")
    gain_cells = [(table.variant_ids[0], table.variant_ids[1])]
    link = cell_link({"curve_number": CLASS_TARGETS, "point_index": 2}, columns, gain_cells, COCO, COCO_ID, "train")
    assert link["sort"] == "gain" and link["other"] == table.variant_ids[1] and link["descending"] == "0"
    with pytest.raises(ValueError):
        clicked_cell({"curve_number": 0, "point_index": 0}, columns)


def test_clicking_a_reordered_cell_opens_that_class_in_qa(env):
    """Through app.py's router: a click (the selection Plotly sends) on a cell of the sorted,
    filtered COCO heatmap opens Pseudo-label QA on that row's variant and that column's class."""
    from streamlit.util import AttributeDictionary

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/per_class_iou.py").run()
    _pick(at, COCO_ID)
    at.selectbox(key="heatmap_sort").set_value("iou_high").run()
    assert not at.exception
    figure = _figure(at)
    columns = len(figure.data[0].x)
    index = 1 * columns + 4  # row 1 (CAM → dCRF), the fifth shown column
    drawn = figure.data[CLASS_TARGETS]
    class_name = drawn.x[index].rsplit(" (", 1)[0]
    images = _class_images(COCO_ID, "train")
    in_label_order = [COCO.name(c) for c in range(COCO.num_classes) if images.get(c)]
    assert drawn.y[index] == figure.data[0].y[1] and class_name != in_label_order[4]  # sorted: another class
    at.session_state["heatmap"] = AttributeDictionary({"selection": AttributeDictionary(
        {"points": [{"curve_number": CLASS_TARGETS, "point_index": index}], "point_indices": [index], "box": [],
         "lasso": []})})
    at.run()
    assert not at.exception and at.title[0].value == "Pseudo-label QA"
    dcrf = env[1][COCO_ID]["dcrf"]
    assert dict(at.query_params) == {"dataset": COCO_ID, "split": "train", "variant": dcrf, "sort": "errors",
                                     "class": class_name}
    assert at.selectbox(key="dataset").value.id == COCO_ID
    assert at.selectbox(key="qa_class").value == COCO.index(class_name)
    assert at.selectbox(key="qa_variant").value == dcrf and at.selectbox(key="qa_sort").value == "errors"


def test_no_ground_truth_shows_the_count_not_numbers(env):
    at = _page("per_class_iou.py").run()
    _pick(at, COCO_ID)
    at.selectbox(key="split").set_value("val").run()
    assert not at.exception
    assert at.info[0].value == ("No ground truth: 12 label maps, 0 images with masks — per-class figures need "
                                "masks.")
    assert not at.get("plotly_chart")

    # Some images with masks: the figures say over how many.
    at.selectbox(key="split").set_value("trainval").run()
    assert not at.exception
    assert "IoU over 10 of 16 labelled images (the ones with ground truth)." in [c.value for c in at.caption]
    table = _table(COCO_ID, "trainval")
    assert table.with_truth.tolist() == [10, 10] and table.labelled.tolist() == [16, 16]
    assert np.allclose(table.iou, _table(COCO_ID, "train").iou, equal_nan=True)  # the 6 without masks add nothing
    heat = _figure(at).data[0]
    assert "10 of them on images with ground truth" in _figure(at).data[MIOU_TARGETS].hovertext[0]
    assert heat.text[0][0] != ""


def test_ensemble_page_says_how_many_images_have_ground_truth(env):
    at = _page("ensemble.py").run()
    assert not at.exception
    at.selectbox(key="split").set_value("trainval").run()
    assert not at.exception
    assert any("Selection subset: 9 image(s) (6 with ground truth: the figures are over those)" in c.value
               for c in at.caption)
    at.selectbox(key="split").set_value("val").run()
    assert not at.exception
    assert at.info[0].value.startswith("No ground truth: 3 label maps per candidate, 0 images with masks")
    assert not at.metric


# --- QA ----------------------------------------------------------------------------------------


def _grid(at: AppTest) -> list[str]:
    return [b.key.removeprefix("qa_open_") for b in at.button if b.key and b.key.startswith("qa_open_")]


def _usable(dataset_id: str, split: str):
    with connect(_cache_dir(), read_only=True) as con:
        return {r.image_id: r for r in queries.usable_images(con, dataset_id, split)}


def test_qa_class_pickers_follow_the_dataset_and_filter_by_any_class(env):
    at = _page("qa.py").run()
    assert not at.exception
    assert at.selectbox(key="qa_class").options == ["whole image", *VOC.names]
    assert at.multiselect(key="qa_classes").options == list(VOC.names[1:])
    voc_class = max(VOC.foreground, key=lambda c: sum(c in r.labels for r in _usable(VOC_ID, "train").values()))
    at.selectbox(key="qa_class").set_value(voc_class).run()

    _pick(at, COCO_ID)
    assert not at.exception
    assert at.selectbox(key="qa_class").options == ["whole image", *COCO.names]
    assert at.selectbox(key="qa_class").value is None  # the VOC class id means nothing here: reset
    assert at.multiselect(key="qa_classes").options == list(COCO.names[1:])

    # Filter by a COCO class beyond VOC's label range: the images whose labels hold it.
    images = _usable(COCO_ID, "train")
    beyond = next(c for c in COCO.foreground if c > max(VOC.foreground) and any(c in r.labels for r in images.values()))
    at.multiselect(key="qa_classes").set_value([beyond]).run()
    assert not at.exception
    holding = sorted(i for i, r in images.items() if beyond in r.labels)
    assert _grid(at) == holding and 0 < len(holding) < len(images)
    caption = next(c.value for c in at.caption if c.value.startswith(f"**{holding[0]}**"))
    assert COCO.name(beyond) in caption

    # Sort by that class's IoU in CAM: the order the label maps give.
    cam = env[1][COCO_ID]["cam"]
    at.multiselect(key="qa_classes").set_value([]).run()
    at.selectbox(key="qa_sort").set_value("iou").run()
    at.selectbox(key="qa_variant").set_value(cam).run()
    at.selectbox(key="qa_class").set_value(beyond).run()
    assert not at.exception
    expected = {}
    for image_id in images:
        truth = _mask(Path(images[image_id].mask_path))
        iou = iou_from_counts(confusion_counts(truth, _label(truth, "cam"), COCO.num_classes))[beyond]
        if np.isfinite(iou) and (truth == beyond).any():
            expected[image_id] = iou
    assert _grid(at) == sorted(expected, key=lambda i: (expected[i], i))


def test_a_heatmap_link_names_the_dataset_and_a_class_of_its_set(env):
    cam = env[1][COCO_ID]["cam"]
    at = _page("qa.py", dataset=COCO_ID, split="train", variant=cam, sort="errors", **{"class": "teddy bear"}).run()
    assert not at.exception
    assert at.selectbox(key="dataset").value.id == COCO_ID
    assert at.selectbox(key="qa_class").value == COCO.index("teddy bear") == 78
    assert at.selectbox(key="qa_variant").value == cam
    images = _usable(COCO_ID, "train")
    assert set(_grid(at)) == {i for i, r in images.items() if 78 in r.labels}


def test_the_open_image_draws_and_lists_the_datasets_classes(env):
    cache_dir, variants = env
    cam = variants[COCO_ID]["cam"]
    images = _usable(COCO_ID, "train")
    image_id = max(images, key=lambda i: max(images[i].labels))  # one with a class beyond VOC's range
    at = _page("qa.py", dataset=COCO_ID, split="train", variant=cam, image=image_id).run()
    assert not at.exception
    legend = at.dataframe[0].value
    truth = _mask(Path(images[image_id].mask_path))
    with connect(cache_dir, read_only=True) as con:
        label = read_label_map(cache_dir / queries.label_map_rows(con, cam)[image_id][0])
    present = sorted(set(np.unique(truth)) | set(np.unique(label)))
    assert list(legend["class"]) == [COCO.name(int(c)) for c in present]
    assert list(legend["colour"]) == ["#%02x%02x%02x" % tuple(COCO.palette[c]) for c in present]
    counts = confusion_counts(truth, label, COCO.num_classes)
    iou = iou_from_counts(counts)
    name = at.selectbox(key="qa_layer_a").format_func(cam)
    for _, row in legend.iterrows():
        c = COCO.index(row["class"])
        assert row["ground truth px"] == int((truth == c).sum())
        assert row[f"{name} IoU"] == pytest.approx(round(100 * iou[c], 1))

    # An image registered without a mask: no ground-truth layer, no IoU, still its classes.
    val = _usable(COCO_ID, "val")
    image_id = sorted(val)[0]
    at = _page("qa.py", dataset=COCO_ID, split="val", image=image_id).run()
    assert not at.exception
    assert "gt" not in at.selectbox(key="qa_layer_a").options
    assert any("no ground truth" in c.value for c in at.caption)
    legend = at.dataframe[0].value
    assert "ground truth px" not in legend.columns and not any(col.endswith("IoU") for col in legend.columns)
    assert set(val[image_id].labels) <= {COCO.index(n) for n in legend["class"]}


def test_home_names_the_class_set(env):
    at = _page("home.py").run()
    assert not at.exception
    assert any(c.value.startswith("21 classes (label 0 is background") for c in at.caption)
    _pick(at, COCO_ID)
    assert any(c.value.startswith("81 classes (label 0 is background; layout coco2014)") for c in at.caption)


def test_switching_datasets_closes_the_open_image(env):
    image_id = sorted(_usable(VOC_ID, "train"))[0]
    at = _page("qa.py").run()
    at.button(key=f"qa_open_{image_id}").click().run()
    assert at.session_state["qa_image"] == image_id
    _pick(at, COCO_ID)
    assert not at.exception and at.session_state["qa_image"] is None
    assert _grid(at) == sorted(_usable(COCO_ID, "train"))
