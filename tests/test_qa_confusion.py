"""Pseudo-label QA sorted by one cell of a variant's class confusion ("ground-truth dog labelled
as cat"): ``cache.qa.find_images`` and the QA page's link, over a copy of the baseline cache
(CAM and CAM -> dCRF on 8 real train images, recorded by the real worker) plus an imported
variant, the real masks shifted 9 px right with their 255 borders, so that some ground-truth
pixels are labelled undecided. Expected orders come from ``engine.ops.sweep.confusion_pairs`` of
the decoded label maps and masks."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cache import qa, queries
from cache.classes import IGNORE_INDEX, VOC
from cache.db import connect
from cache.labelmaps import read_label_map, write_label_map
from engine.core.chains import dataset_id_for
from engine.core.dataset import read_mask
from engine.ops.sweep import confusion_pairs
from tests.conftest import REPO

MAIN = sys.modules["__main__"]  # pytest's, before any AppTest run replaced it
SHIFT = 9  # pixels the "shifted" variant moves each mask to the right


@pytest.fixture(scope="module")
def confusion_cache(baseline_cache, tmp_path_factory) -> tuple[Path, str, dict[str, tuple[str, dict]]]:
    """``(cache_dir, dataset_id, {step: (variant id, {image_id: {(gt, pred): pixels}})})`` for the
    steps "cam", "dcrf" and "import" (the shifted masks, 255 kept: undecided pixels), the cells
    computed here from the decoded files."""
    from engine.methods.imported import import_step
    from engine.runtime.jobs import submit_chain
    from engine.runtime.worker import WorkerConfig, serve

    base = tmp_path_factory.mktemp("confusion")
    cache_dir, root = base / "cache", baseline_cache[1]
    shutil.copytree(baseline_cache[0], cache_dir)
    dataset_id = dataset_id_for(root)
    folder = base / "shifted"
    folder.mkdir()
    for image_id in (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        mask = np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        write_label_map(folder / f"{image_id}.png", np.roll(mask, SHIFT, axis=1))
    submit_chain(cache_dir, root, "train", [import_step(folder, "shifted")])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    cells = {}
    with connect(cache_dir, read_only=True) as con:
        images = queries.usable_images(con, dataset_id, "train")
        for v in queries.variants(con, dataset_id):
            maps = queries.label_map_rows(con, v.id)
            cells[v.step] = (v.id, {
                r.image_id: {(g, p): n for g, p, n in confusion_pairs(
                    read_mask(Path(r.mask_path)), read_label_map(cache_dir / maps[r.image_id][0]),
                    VOC.num_classes).tolist()}
                for r in images})
    assert set(cells) == {"cam", "dcrf", "import"} and all(len(c) == 8 for _, c in cells.values())
    return cache_dir, dataset_id, cells


def _cell(cells: dict[str, dict], undecided: bool) -> tuple[int, int]:
    """The off-diagonal cell held by the most images (then the most pixels, then the lowest ids);
    with ``undecided``, the most held (class, 255) cell."""
    held: dict[tuple[int, int], list[int]] = {}
    for image_cells in cells.values():
        for (g, p), n in image_cells.items():
            if g != p and (p == IGNORE_INDEX) == undecided:
                held.setdefault((g, p), []).append(n)
    assert held, "no such cell in the real label maps"
    return min(held, key=lambda c: (-len(held[c]), -sum(held[c]), c))


def _expected(cells: dict[str, dict], cell: tuple[int, int], descending: bool = True) -> list[tuple[str, int]]:
    """``[(image_id, pixels)]`` of the images holding ``cell``, in the sort's order (ties: id)."""
    found = [(i, c[cell]) for i, c in cells.items() if cell in c]
    return sorted(found, key=lambda r: (-r[1] if descending else r[1], r[0]))


@pytest.mark.parametrize("step, undecided, descending", [
    ("cam", False, True), ("dcrf", False, True), ("import", False, True), ("import", True, True),
    ("import", True, False)])
def test_confusion_sort_lists_the_images_holding_the_cell_by_its_pixels(confusion_cache, step, undecided,
                                                                         descending):
    cache_dir, dataset_id, by_step = confusion_cache
    variant_id, cells = by_step[step]
    gt, pred = _cell(cells, undecided)
    expected = _expected(cells, (gt, pred), descending)
    query = qa.ImageQuery("train", variant=variant_id, class_id=gt, sort="confusion", confused_as=pred,
                          descending=None if descending else False)
    with connect(cache_dir, read_only=True) as con:
        page = qa.find_images(con, dataset_id, query, limit=100)
        first_two = qa.find_images(con, dataset_id, query, limit=2, offset=0)
    assert len(expected) >= 2  # a real order, not one image
    assert page.total == first_two.total == len(expected)  # images without the cell are left out
    assert [(r["image_id"], r["value"]) for r in page.rows] == [(i, float(n)) for i, n in expected]
    assert [r["image_id"] for r in first_two.rows] == [i for i, _ in expected[:2]]


def test_an_absent_cell_lists_no_image(confusion_cache):
    cache_dir, dataset_id, by_step = confusion_cache
    variant_id, cells = by_step["cam"]
    # CAM labels only background and the image's classes, never 255, so no pixel is undecided.
    assert not any(p == IGNORE_INDEX for c in cells.values() for _, p in c)
    query = qa.ImageQuery("train", variant=variant_id, class_id=0, sort="confusion", confused_as=qa.UNDECIDED)
    with connect(cache_dir, read_only=True) as con:
        page = qa.find_images(con, dataset_id, query)
    assert page.total == 0 and page.rows == []


@pytest.mark.parametrize("kwargs, message", [
    ({"sort": "confusion", "class_id": 12, "confused_as": 0}, "needs a variant"),
    ({"sort": "confusion", "variant": "v", "confused_as": 0}, "needs a ground-truth class id"),
    ({"sort": "confusion", "variant": "v", "class_id": 255, "confused_as": 0}, "needs a ground-truth class id"),
    ({"sort": "confusion", "variant": "v", "class_id": 12}, "needs the class the pixels were labelled as"),
    ({"sort": "confusion", "variant": "v", "class_id": 12, "confused_as": 256}, "labelled as"),
    ({"sort": "confusion", "variant": "v", "class_id": 12, "confused_as": 12}, "true positive, not a confusion"),
    ({"sort": "errors", "variant": "v", "class_id": 12, "confused_as": 8}, "for sort 'confusion' only")])
def test_a_bad_confusion_query_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qa.ImageQuery("train", **kwargs)


# --- the QA page -------------------------------------------------------------------------------


@pytest.fixture
def page_env(confusion_cache, baseline_cache, monkeypatch):
    monkeypatch.setenv("ISLE_CACHE_DIR", str(confusion_cache[0]))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(baseline_cache[1]))
    monkeypatch.setitem(sys.modules, "__main__", MAIN)
    return confusion_cache


def _page(**params: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app_pages" / "qa.py"), default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    return at


def _grid(at: AppTest) -> list[str]:
    """The image ids of the grid, in page order (from each cell's "Open" button)."""
    return [b.key.removeprefix("qa_open_") for b in at.button if b.key and b.key.startswith("qa_open_")]


def _captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith("**")]


@pytest.mark.parametrize("step, undecided", [("cam", False), ("import", True)])
def test_a_confusion_link_shows_the_cells_images_most_pixels_first(page_env, step, undecided):
    cache_dir, dataset_id, by_step = page_env
    variant_id, cells = by_step[step]
    gt, pred = _cell(cells, undecided)
    expected = _expected(cells, (gt, pred))
    as_name = "undecided" if pred == IGNORE_INDEX else VOC.name(pred)
    # What a confusion-matrix cell links to.
    at = _page(split="train", sort="confusion", variant=variant_id, **{"class": VOC.name(gt), "as": as_name}).run()
    assert not at.exception
    assert at.selectbox(key="qa_sort").value == "confusion" and at.selectbox(key="qa_variant").value == variant_id
    assert at.selectbox(key="qa_class").value == gt and at.selectbox(key="qa_confused_as").value == pred
    assert at.toggle(key="qa_descending").value is True
    options = at.selectbox(key="qa_confused_as").options  # labelled as itself is no confusion
    assert VOC.name(gt) not in options and len(options) == VOC.num_classes and options[-1] == "undecided (255)"
    assert _grid(at) == [i for i, _ in expected]
    shown = "undecided (255)" if pred == IGNORE_INDEX else VOC.name(pred)
    assert [c.split(" · ")[0] for c in _captions(at)] == [f"**{i}** {n:,} px {VOC.name(gt)} → {shown}"
                                                         for i, n in expected]
    assert at.number_input(key="qa_page").label.startswith(f"Page (of 1; {len(expected)} image(s))")


def test_the_labelled_as_select_shows_with_the_confusion_sort_only(page_env):
    cache_dir, dataset_id, by_step = page_env
    variant_id, cells = by_step["dcrf"]
    gt, pred = _cell(cells, False)
    at = _page().run()
    assert not any(s.key == "qa_confused_as" for s in at.selectbox)
    at.selectbox(key="qa_sort").set_value("confusion").run()
    at.selectbox(key="qa_variant").set_value(variant_id).run()
    assert not at.exception and _grid(at) == []
    assert "Choose the ground-truth class and what the variant labelled it as." in [i.value for i in at.info]
    at.selectbox(key="qa_class").set_value(gt).run()
    at.selectbox(key="qa_confused_as").set_value(pred).run()
    assert not at.exception
    assert _grid(at) == [i for i, _ in _expected(cells, (gt, pred))]
    at.toggle(key="qa_descending").set_value(False).run()
    assert _grid(at) == [i for i, _ in _expected(cells, (gt, pred), descending=False)]
    at.selectbox(key="qa_sort").set_value("errors").run()
    assert not at.exception and not any(s.key == "qa_confused_as" for s in at.selectbox)


def test_a_variant_without_confusion_rows_is_named(page_env, tmp_path, monkeypatch):
    cache_dir, dataset_id, by_step = page_env
    old = tmp_path / "cache"
    shutil.copytree(cache_dir, old)
    variant_id, cells = by_step["cam"]
    with connect(old) as con:  # as a variant recorded before schema 8 reads
        con.execute("DELETE FROM confusion WHERE variant_id = ?", [variant_id])
    monkeypatch.setenv("ISLE_CACHE_DIR", str(old))
    gt, pred = _cell(cells, False)
    at = _page(sort="confusion", variant=variant_id, **{"class": VOC.name(gt), "as": VOC.name(pred)}).run()
    assert not at.exception and _grid(at) == []
    assert any("has no class confusion recorded" in w.value and f"python -m engine recount {variant_id}" in w.value
               for w in at.warning)
