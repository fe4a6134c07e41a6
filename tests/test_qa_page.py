"""The Pseudo-label QA page, driven by AppTest over a copy of the baseline cache (CAM and CAM ->
dCRF on 8 real train images): its sorts and filters against numbers computed here from the decoded
label maps, the link a heatmap cell opens, the single-image view, flags, and their use as the ISLE
selection's exclusion list."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cache import qa, queries
from cache.classes import VOC
from cache.db import connect
from cache.labelmaps import read_label_map
from engine.core.chains import dataset_id_for
from engine.core.dataset import read_mask
from engine.isle import assignments
from engine.isle.numerics import Subset
from engine.ops.metrics import confusion_counts, iou_from_counts
from tests.conftest import REPO

MAIN = sys.modules["__main__"]  # pytest's, before any AppTest run replaced it


@pytest.fixture
def qa_env(baseline_cache, tmp_path, monkeypatch):
    """A writable copy of the baseline cache, and what the tests compare the page with: per
    variant step ("cam", "dcrf") its id and ``{image_id: (ground truth, label map)}`` decoded
    from the files."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(baseline_cache[0], cache_dir)
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(baseline_cache[1]))
    monkeypatch.setitem(sys.modules, "__main__", MAIN)
    dataset_id = dataset_id_for(baseline_cache[1])
    with connect(cache_dir, read_only=True) as con:
        images = {r.image_id: r for r in queries.usable_images(con, dataset_id, "train")}
        variants = {}
        for v in queries.variants(con, dataset_id):
            maps = queries.label_map_rows(con, v.id)
            variants[v.step] = (v.id, {i: (read_mask(Path(images[i].mask_path)),
                                                 read_label_map(cache_dir / maps[i][0])) for i in images})
    return cache_dir, dataset_id, images, variants


def _page(**params: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app_pages" / "qa.py"), default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    return at


def _grid(at: AppTest) -> list[str]:
    """The image ids of the grid, in page order (from each cell's "Open" button)."""
    return [b.key.removeprefix("qa_open_") for b in at.button if b.key and b.key.startswith("qa_open_")]


def _class_iou(pair: tuple[np.ndarray, np.ndarray], class_id: int) -> float:
    return iou_from_counts(confusion_counts(*pair, VOC.num_classes))[class_id]


def test_grid_sorts_and_filters_agree_with_the_decoded_label_maps(qa_env):
    cache_dir, dataset_id, images, variants = qa_env
    cam_id, cam = variants["cam"]
    at = _page().run()
    assert not at.exception
    assert _grid(at) == sorted(images)  # default: every usable image, by id

    # Per-image IoU of the most common class, lowest first: the order numpy gives from the files.
    class_id = max(VOC.foreground, key=lambda c: sum(c in r.labels for r in images.values()))
    at.selectbox(key="qa_sort").set_value("iou").run()
    at.selectbox(key="qa_variant").set_value(cam_id).run()
    at.selectbox(key="qa_class").set_value(class_id).run()
    assert not at.exception
    expected = {i: _class_iou(pair, class_id) for i, pair in cam.items()}
    expected = {i: v for i, v in expected.items() if not np.isnan(v)}
    assert _grid(at) == sorted(expected, key=lambda i: (expected[i], i))
    shown = [c.value for c in at.caption if c.value.startswith("**")]
    first = min(expected, key=lambda i: (expected[i], i))
    assert shown[0].startswith(f"**{first}** IoU {100 * expected[first]:.1f}%")

    # Largest first reverses it; the class filter keeps the images whose ground truth holds it.
    at.toggle(key="qa_descending").set_value(True).run()
    assert _grid(at) == sorted(expected, key=lambda i: (-expected[i], i))
    at.multiselect(key="qa_classes").set_value([class_id]).run()
    holding = {i for i, r in images.items() if class_id in r.labels}
    assert set(_grid(at)) == holding and len(holding) < len(images)

    # Disagreement between CAM and CAM -> dCRF over the whole image: most first, by the bound
    # cache/qa.py documents, which never exceeds the share of pixels the two label differently.
    at.multiselect(key="qa_classes").set_value([]).run()
    at.selectbox(key="qa_class").set_value(None).run()
    at.selectbox(key="qa_sort").set_value("disagreement").run()
    dcrf_id, dcrf = variants["dcrf"]
    at.selectbox(key="qa_other").set_value(dcrf_id).run()
    assert not at.exception

    def bound(i: str) -> float:
        (gt, a), (_, b) = cam[i], dcrf[i]
        keep = gt != 255  # counts ignore the ground truth's 255 pixels
        total = 0
        for c in range(VOC.num_classes):
            truth = keep & (gt == c)
            total += abs(int((truth & (a == c)).sum()) - int((truth & (b == c)).sum()))
            total += abs(int((keep & ~truth & (a == c)).sum()) - int((keep & ~truth & (b == c)).sum()))
        assert total / 2 <= ((a != b) & keep).sum()
        return total / 2 / gt.size

    difference = {i: bound(i) for i in images}
    order = _grid(at)
    assert [round(difference[i], 9) for i in order] == sorted((round(v, 9) for v in difference.values()), reverse=True)

    # Paging: 12 per page at most, so all 8 are on page 1; the page count says so.
    assert at.number_input(key="qa_page").label.startswith("Page (of 1; 8 image(s))")


def test_a_heatmap_link_opens_the_cells_images_worst_first(qa_env):
    cache_dir, dataset_id, images, variants = qa_env
    cam_id, cam = variants["cam"]
    class_id = max(VOC.foreground, key=lambda c: sum(c in r.labels for r in images.values()))
    # What app_pages/per_class_iou.py sends on a click on the (CAM, class) cell.
    at = _page(split="train", variant=cam_id, sort="errors", **{"class": VOC.name(class_id)}).run()
    assert not at.exception
    assert at.selectbox(key="qa_sort").value == "errors" and at.selectbox(key="qa_variant").value == cam_id
    assert at.selectbox(key="qa_class").value == class_id and at.toggle(key="qa_descending").value is True
    errors = {}
    for i, pair in cam.items():
        counts = confusion_counts(*pair, VOC.num_classes)[class_id]
        if counts.sum():
            errors[i] = int(counts[1] + counts[2])
    assert _grid(at) == sorted(errors, key=lambda i: (-errors[i], i))


def test_open_an_image_flag_it_and_keep_it_out_of_the_isle_selection(qa_env):
    cache_dir, dataset_id, images, variants = qa_env
    cam_id, cam = variants["cam"]
    at = _page().run()
    at.selectbox(key="qa_variant").set_value(cam_id).run()
    image_id = _grid(at)[0]
    at.button(key=f"qa_open_{image_id}").click().run()
    assert not at.exception and at.session_state["qa_image"] == image_id
    assert any(m.value == f"### {image_id}" for m in at.markdown)
    assert at.selectbox(key="qa_layer_a").value == cam_id  # the grid's variant is layer A

    # The legend: ground-truth and CAM pixels and IoU per class of this image, from the files.
    gt, label = cam[image_id]
    cam_name = at.selectbox(key="qa_layer_a").format_func(cam_id)
    legend = at.dataframe[0].value
    counts = confusion_counts(gt, label, VOC.num_classes)
    for _, row in legend.iterrows():
        c = VOC.index(row["class"])
        assert row["ground truth px"] == int(((gt == c)).sum())
        assert row[f"{cam_name} px"] == int(counts[c, 0] + counts[c, 1])
    assert set(legend["class"]) == {VOC.name(c) for c in range(VOC.num_classes) if (gt == c).any() or (label == c).any()}

    # CAM stored class scores: the heatmap offers each stored class of this image.
    scores_class = at.selectbox(key="qa_scores_class")
    assert at.selectbox(key="qa_scores_variant").value == cam_id
    assert set(scores_class.options) <= {VOC.name(c) for c in (0, *images[image_id].labels)}
    assert VOC.name(images[image_id].labels[-1]) == scores_class.options[scores_class.index]

    # The comparison slider with the ground truth as layer B draws one picture.
    at.selectbox(key="qa_layer_b").set_value("gt").run()
    at.radio(key="qa_mode").set_value("comparison slider").run()
    assert not at.exception and at.slider(key="qa_wipe").value == 0.5

    at.selectbox(key="qa_flag_kind").set_value("wrong_gt").run()
    at.text_input(key="qa_flag_note").input("the dog's leg is labelled chair").run()
    at.button(key="qa_flag").click().run()
    assert not at.exception
    with connect(cache_dir, read_only=True) as con:
        stored = qa.flags(con, dataset_id)
    assert [(f["image_id"], f["kind"], f["note"], f["variant_id"]) for f in stored] == [
        (image_id, "wrong_gt", "the dog's leg is labelled chair", cam_id)]
    assert "Remove" in [b.label for b in at.button]

    # Back on the grid, the flag filter finds it, and the flag list names it.
    at.button(key="qa_back").click().run()
    at.selectbox(key="qa_flagged").set_value("flagged").run()
    assert _grid(at) == [image_id]
    flag_table = at.dataframe[0].value
    assert list(flag_table["image"]) == [image_id] and list(flag_table["kind"]) == ["wrong ground truth"]

    # The ISLE page keeps it out of the selection subset when asked.
    ensemble = AppTest.from_file(str(REPO / "app_pages" / "ensemble.py"), default_timeout=60).run()
    ensemble.multiselect(key="exclude_flagged").set_value(["wrong_gt"]).run()
    assert not ensemble.exception
    assert "1 flagged image(s) kept out of the selection subset." in [c.value for c in ensemble.caption]
    assert any("Selection subset: 7 image(s)" in c.value for c in ensemble.caption)
    with connect(cache_dir, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train") if c.default]
        kept = assignments.build_plan(con, dataset_id, "train", candidates,
                                      Subset(exclude=(image_id,)))
    assert kept.selection.labelled.tolist() == [7, 7]


def test_bad_input_is_named_not_a_traceback(qa_env):
    cache_dir, dataset_id, images, variants = qa_env
    cam_id, _ = variants["cam"]
    with connect(cache_dir, read_only=True) as con:
        path, _ = queries.label_map_rows(con, cam_id)[sorted(images)[0]]
    (cache_dir / path).unlink()
    at = _page().run()
    at.selectbox(key="qa_variant").set_value(cam_id).run()
    at.selectbox(key="qa_grid_layer").set_value(cam_id).run()
    assert not at.exception
    assert any(str(cache_dir / path) in e.value and "missing" in e.value for e in at.error)
    assert len(_grid(at)) == len(images)  # the other images still show

    at = _page(image="no_such_image").run()
    assert not at.exception
    assert "Image 'no_such_image' is not a usable image of train." in at.error[0].value


def test_command_line_lists_flags_and_isle_keeps_them_out_of_the_selection(qa_env, baseline_cache):
    cache_dir, dataset_id, images, variants = qa_env
    root = baseline_cache[1]
    first, second = sorted(images)[:2]
    with connect(cache_dir) as con:
        qa.set_flag(con, dataset_id, first, "wrong_gt", "mask misses the tail")
        qa.set_flag(con, dataset_id, second, "hard_case")
    command = [sys.executable, "-m", "engine", "--cache", str(cache_dir), "--root", str(root)]
    listed = subprocess.run([*command, "flags", "--kind", "wrong_gt"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [first]
    table = subprocess.run([*command, "flags", "--table"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert table.stdout.splitlines() == [f"{first}\twrong_gt\tmask misses the tail\t", f"{second}\thard_case\t\t"]

    done = subprocess.run([*command, "isle", "--name", "clean", "--exclude-flagged", "wrong_gt"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "1 flagged image(s) kept out of the selection subset" in done.stdout
    with connect(cache_dir, read_only=True) as con:
        (saved,) = queries.assignment_history(con, dataset_id, "train", "clean")
    assert assignments.decode(saved).subset.exclude == (first,)
