"""The Streamlit pages, driven by AppTest over a cache the real worker filled."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import plotly.io
import pytest
from streamlit.testing.v1 import AppTest

from cache import queries, reports
from cache.classes import VOC
from cache.db import connect
from cache.labelmaps import write_label_map
from engine.core import registry
from engine.core.chains import Step, chain_variants, dataset_id_for
from tests.conftest import REPO, TINY_CAM
from ui.charts import ellipsize

# The baseline cache's variant names: the tiny CAM settings differ from the defaults, so its name
# lists them (engine.runtime.jobs names variants by the parameters that differ).
BASELINE_NAMES = [row.name for row in chain_variants("d", [Step("cam", TINY_CAM), Step("dcrf")])]


@pytest.fixture
def app_env(baseline_cache, monkeypatch):
    cache_dir, root = baseline_cache
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    # AppTest runs the page as __main__; restore it, or later spawned worker processes (dCRF,
    # dataset scan) would re-run the page script as their main module.
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    return cache_dir, root


def _typed_array(value) -> np.ndarray:
    """Plotly 7 sends numpy arrays as ``{"dtype", "bdata" (base64), "shape"}``."""
    if isinstance(value, dict):
        shape = tuple(int(n) for n in value["shape"].split(","))
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).reshape(shape)
    return np.array(value, dtype=float)


def _page(name: str) -> AppTest:
    return AppTest.from_file(str(REPO / "app_pages" / name), default_timeout=60)


def test_home_lists_variants_and_finished_jobs(app_env):
    at = _page("home.py").run()
    assert not at.exception
    frames = [f.value for f in at.dataframe]
    jobs = next(f for f in frames if "status" in f.columns)
    assert set(jobs["status"]) == {"done"}
    assert {"scan", "label"} <= set(jobs["kind"])
    variants = next(f for f in frames if "variant" in f.columns and "label maps" in f.columns)
    assert list(variants["variant"]) == BASELINE_NAMES
    assert list(variants["label maps"]) == [8, 8]


def test_home_button_queues_the_baseline_once(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("ISLE_CACHE_DIR", str(tmp_path / "fresh"))  # an empty cache
    at = _page("home.py").run()
    assert not at.exception
    assert "No cache yet" in at.info[0].value
    at.button(key="queue_baseline").click().run()
    assert "Queued jobs [1, 2, 3]" in at.toast[0].value
    at.button(key="queue_baseline").click().run()  # a second click adds nothing
    with connect(tmp_path / "fresh", read_only=True) as con:
        jobs = con.execute("SELECT kind, status, depends_on FROM jobs ORDER BY id").fetchall()
    assert jobs == [("scan", "queued", None), ("label", "queued", 1), ("label", "queued", 2)]
    status = at.dataframe[0].value
    assert list(status["status"]) == ["queued"] * 3
    assert "none is running" in " ".join(c.value for c in at.caption)


def test_heatmap_page_shows_both_variants_with_the_cached_numbers(app_env):
    cache_dir, root = app_env
    at = _page("per_class_iou.py").run()
    assert not at.exception
    assert at.selectbox(key="split").value == "train"
    figure = plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)
    heat, miou = figure.data[0], figure.data[1]  # the classes, and the frozen mIoU column left of them
    assert [y.split(" · ")[0] for y in heat.y] == BASELINE_NAMES
    with connect(cache_dir, read_only=True) as con:
        table = reports.iou_table(con, dataset_id_for(root), "train")
        images = queries.class_image_counts(con, dataset_id_for(root), "train")
    # Classes without images are hidden by default (and named in a note); the rest in label order.
    shown = [c for c in range(VOC.num_classes) if images.get(c)]
    assert list(miou.x) == ["mIoU"] and [x.rsplit(" (", 1)[0] for x in heat.x] == [VOC.names[c] for c in shown]
    assert np.allclose(_typed_array(heat.z), table.iou[:, shown] * 100, equal_nan=True)
    assert np.allclose(_typed_array(miou.z)[:, 0], table.miou * 100)
    assert "no images" not in heat.text[0][0]
    note = next(c.value for c in at.caption if c.value.startswith("No image of"))
    assert "aeroplane" in note and "hidden" in note

    # Shown again, an empty class is an empty cell, never a 0.
    at.toggle(key="heatmap_hide_empty").set_value(False).run()
    heat = plotly.io.from_json(at.get("plotly_chart")[0].proto.spec).data[0]
    assert len(heat.x) == VOC.num_classes and heat.x[1] == "aeroplane (no images)"
    z = _typed_array(heat.z)
    assert np.allclose(z, table.iou * 100, equal_nan=True)
    assert np.isnan(z[:, 1]).all() and heat.text[0][1] in ("no images", "–")


def test_heatmap_page_switches_to_val(app_env):
    at = _page("per_class_iou.py").run()
    at.selectbox(key="split").set_value("val").run()
    assert not at.exception
    assert "No variant has label maps on val" in at.info[0].value


def test_home_lists_the_images_a_job_skipped(app_env, tmp_path, monkeypatch):
    import shutil

    cache_dir = tmp_path / "cache"
    shutil.copytree(app_env[0], cache_dir)
    with connect(cache_dir) as con:
        con.execute("UPDATE jobs SET n_errors = 1 WHERE id = 2")
        con.execute("INSERT INTO image_errors VALUES (2, NULL, '2007_000063', '/x/2007_000063.jpg: cannot decode image', 0)")
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    at = _page("home.py").run()
    assert not at.exception
    (expander,) = [e for e in at.expander if "skipped" in e.label]
    assert expander.label == "job 2: 1 image(s) skipped for bad input"
    skipped = expander.dataframe[0].value
    assert list(skipped["image_id"]) == ["2007_000063"] and "cannot decode" in skipped["message"][0]


def _jobs(cache_dir) -> list[tuple]:
    with connect(cache_dir, read_only=True) as con:
        return [(j.kind, j.variant_name, j.status) for j in reversed(queries.recent_jobs(con))]


def test_import_form_queues_a_job_with_the_given_name(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("ISLE_CACHE_DIR", str(tmp_path / "fresh"))
    folder = tmp_path / "labels"
    write_label_map(folder / "2007_000032.png", np.zeros((2, 2), np.uint8))
    at = _page("home.py").run()
    assert at.button(key="queue_import").disabled  # no folder yet
    at.text_input(key="import_folder").input(str(tmp_path / "nowhere")).run()
    at.button(key="queue_import").click().run()
    assert "does not exist" in at.error[0].value and not (tmp_path / "fresh").exists()
    at.text_input(key="import_folder").input(str(folder))
    at.text_input(key="import_name").input("Their labels").run()
    at.button(key="queue_import").click().run()
    assert not at.exception and "Queued jobs [1, 2]" in at.toast[0].value
    assert _jobs(tmp_path / "fresh") == [("scan", None, "queued"), ("label", "Their labels", "queued")]
    with connect(tmp_path / "fresh", read_only=True) as con:
        (variant,) = con.execute("SELECT step, params FROM variants").fetchall()
    assert variant[0] == "import" and json.loads(variant[1])["folder"] == str(folder)
    # npy settings appear only for npy; the chosen ones are the variant's parameters.
    assert not [s for s in at.selectbox if s.key == "import_keys"]
    at.radio(key="import_format").set_value("npy").run()
    at.selectbox(key="import_keys").set_value("class_id").run()
    at.button(key="queue_import").click().run()
    assert "no .npy files (it holds .png files" in at.error[0].value


def test_queue_a_method_control_queues_the_chosen_chain(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("ISLE_CACHE_DIR", str(tmp_path / "fresh"))
    at = _page("home.py").run()
    assert "CAM" in at.selectbox(key="method").options and "Imported" not in at.selectbox(key="method").options
    at.selectbox(key="method").set_value("cam")
    at.multiselect(key="method_refinements").set_value(["dcrf"])
    at.button(key="queue_method").click().run()
    assert not at.exception and "Queued jobs [1, 2, 3]" in at.toast[0].value
    assert _jobs(tmp_path / "fresh") == [("scan", None, "queued"), ("label", "CAM", "queued"),
                                         ("label", "CAM → dCRF", "queued")]


def test_refine_an_existing_variant(app_env, tmp_path, monkeypatch):
    import shutil

    cache_dir = tmp_path / "cache"
    shutil.copytree(app_env[0], cache_dir)
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    before = len(_jobs(cache_dir))
    at = _page("home.py").run()
    assert at.button(key="queue_refinement").disabled  # no refinement chosen yet
    with connect(cache_dir, read_only=True) as con:
        source = next(v.id for v in queries.variants(con, dataset_id_for(app_env[1])) if v.name == BASELINE_NAMES[1])
    assert BASELINE_NAMES[1] in at.selectbox(key="source_variant").options
    at.selectbox(key="source_variant").set_value(source)
    at.multiselect(key="source_refinements").set_value(["dcrf"]).run()
    at.button(key="queue_refinement").click().run()
    assert not at.exception
    jobs = _jobs(cache_dir)
    assert len(jobs) == before + 1 and jobs[-1] == ("label", f"{BASELINE_NAMES[1]} → dCRF", "queued")


def _heatmap(at: AppTest):
    figure = plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)
    return figure.data[0], figure.layout


def test_grouped_view_puts_the_refinement_under_its_source(app_env):
    at = _page("per_class_iou.py").run()
    at.radio(key="view").set_value("grouped").run()
    assert not at.exception
    heat, layout = _heatmap(at)
    assert [y.split(" · ")[0] for y in heat.y] == BASELINE_NAMES  # full names: the hover titles
    assert list(layout.yaxis.tickvals) == list(heat.y)
    root, child = (t.replace("\u00a0", " ").rstrip() for t in layout.yaxis.ticktext)
    assert root == ellipsize(f"{BASELINE_NAMES[0]} · 8 imgs") and child == "   └ dCRF · 8 imgs"


def test_gain_view_is_the_refinement_minus_its_source(app_env):
    cache_dir, root = app_env
    at = _page("per_class_iou.py").run()
    at.radio(key="view").set_value("gain").run()
    assert not at.exception
    heat, _ = _heatmap(at)
    assert list(heat.y) == [f"{BASELINE_NAMES[1]} vs {BASELINE_NAMES[0]}"]
    with connect(cache_dir, read_only=True) as con:
        table = reports.iou_table(con, dataset_id_for(root), "train")
    cam, crf = (table.names.index(name) for name in BASELINE_NAMES)
    shown = [c for c in range(VOC.num_classes) if np.isfinite(table.iou[:, c]).any()]
    expected = (table.iou[crf] - table.iou[cam])[shown] * 100
    figure = plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)
    assert np.allclose(_typed_array(heat.z)[0], expected, equal_nan=True)
    assert np.isclose(_typed_array(figure.data[1].z)[0, 0], (table.miou[crf] - table.miou[cam]) * 100)
    colours = figure.layout.coloraxis
    assert colours.cmid == 0 and colours.cmin == -colours.cmax
    changed = int(np.nanargmax(np.abs(expected)))
    assert heat.text[0][changed] == f"{expected[changed]:+.1f}".replace("-", "\u2212")


def test_queue_a_chain_from_the_heatmap_page_and_see_its_row(app_env, tmp_path, monkeypatch):
    import shutil

    from engine.runtime.worker import WorkerConfig, serve

    cache_dir = tmp_path / "cache"
    shutil.copytree(app_env[0], cache_dir)
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    before = _jobs(cache_dir)
    at = _page("per_class_iou.py").run()
    assert at.button(key="iou_queue_refine").disabled  # no refinement chosen yet
    with connect(cache_dir, read_only=True) as con:
        cam = next(v for v in queries.variants(con, dataset_id_for(app_env[1])) if v.name == BASELINE_NAMES[0])
    at.selectbox(key="iou_refine_source").set_value(cam.id)
    at.multiselect(key="iou_refine_chain").set_value(["dcrf"]).run()
    at.number_input(key="iou_refine_chain.dcrf.iters").set_value(5).run()
    at.button(key="iou_queue_refine").click().run()
    assert not at.exception
    name = f"{BASELINE_NAMES[0]} → dCRF (iters=5)"
    jobs = _jobs(cache_dir)
    assert jobs == [*before, ("label", name, "queued")]
    assert at.toast[0].value == f"Queued jobs [{len(jobs)}]"
    with connect(cache_dir, read_only=True) as con:
        (params,) = con.execute("SELECT params FROM variants WHERE name = ?", [name]).fetchone()
    assert json.loads(params) == {**registry.config_to_params(registry.get("dcrf").make_config()), "iters": 5}
    # The jobs panel of this page shows it with a progress bar.
    assert any(name in p.proto.text for p in at.get("progress"))
    assert "queued" in set(next(f.value for f in at.dataframe if "status" in f.value.columns)["status"])

    at.button(key="iou_queue_refine").click().run()  # the same chain again: its job is reused
    assert at.toast[0].value == f"Queued jobs [{len(jobs)}]" and _jobs(cache_dir) == jobs
    at.number_input(key="iou_refine_chain.dcrf.iters").set_value(10).run()  # the defaults: CAM → dCRF, complete
    at.button(key="iou_queue_refine").click().run()
    assert at.toast[0].value.startswith("Nothing to do") and _jobs(cache_dir) == jobs

    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    at.radio(key="view").set_value("grouped").run()
    heat, layout = _heatmap(at)
    assert [y.split(" · ")[0] for y in heat.y] == [BASELINE_NAMES[0], BASELINE_NAMES[1], name]
    assert [t.replace("\u00a0", " ").strip().split(" · ")[0] for t in layout.yaxis.ticktext][1:] == \
        ["└ dCRF", "└ dCRF (iters=5)"]


def test_long_row_labels_are_shortened_in_the_middle():
    assert ellipsize("abcdefghij", 5) == "ab…ij" and len(ellipsize("x" * 100)) == 60
    assert ellipsize("CAM → dCRF") == "CAM → dCRF"
