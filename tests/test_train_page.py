"""The Train page, driven by AppTest over a copy of the baseline cache (CAM and CAM -> dCRF on 8
real train images, 4 val images): a tiny DeepLabV3+ training on the ground truth launched from the
page, run by the real worker, then its curves, its row in the comparison and its predictions on
another split queued from the page; bad settings show an error instead of a traceback."""

from __future__ import annotations

import shutil
import sys

import plotly.io
import pytest
from streamlit.testing.v1 import AppTest

from cache import queries
from cache.db import connect
from engine.core.chains import dataset_id_for
from engine.runtime.trainings import trainings
from tests.conftest import REPO

MAIN = sys.modules["__main__"]  # pytest's, before any AppTest run replaced it
# A training small enough for a test: 2 steps on 8 images, validation curve on 2 val images.
TINY = {"epochs": 1, "batch_size": 4, "crop_size": 128, "val_images": 2}


@pytest.fixture
def train_env(baseline_cache, tmp_path, monkeypatch):
    """A writable copy of the baseline cache (label map paths are relative to it)."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(baseline_cache[0], cache_dir)
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(baseline_cache[1]))
    # AppTest runs the page as __main__; restore it for processes the worker spawns later.
    monkeypatch.setitem(sys.modules, "__main__", MAIN)
    return cache_dir, baseline_cache[1]


def _page() -> AppTest:
    return AppTest.from_file(str(REPO / "app_pages" / "train.py"), default_timeout=60)


def _set_params(at: AppTest, params: dict) -> None:
    for name, value in params.items():
        at.number_input(key=f"train.deeplab.{name}").set_value(value)


def _jobs(cache_dir) -> list[dict]:
    with connect(cache_dir, read_only=True) as con:
        return queries.recent_jobs(con)


def _figure(at: AppTest, title: str):
    """The plotly figure of the page whose layout title is ``title``."""
    figures = [plotly.io.from_json(chart.proto.spec) for chart in at.get("plotly_chart")]
    return next(f for f in figures if f.layout.title.text == title)


def test_launch_follow_compare_and_predict(train_env):
    from engine.runtime.worker import WorkerConfig, serve

    cache_dir, root = train_env
    dataset_id = dataset_id_for(root)
    at = _page().run()
    assert not at.exception
    assert at.selectbox(key="train_split").value == "train" and at.selectbox(key="eval_split").value == "val"
    options = at.selectbox(key="label_set").options
    assert options[-1] == "Ground truth (upper bound)" and len(options) == 3  # CAM, CAM -> dCRF, gt
    assert "No training yet." in [c.value for c in at.caption]

    at.selectbox(key="label_set").set_value("gt")
    _set_params(at, TINY)
    at.run()
    assert "python -m engine train gt --param deeplab.epochs=1 --param deeplab.batch_size=4" in " ".join(
        c.value for c in at.caption)
    before = len(_jobs(cache_dir))
    at.button(key="train_submit").click().run()
    assert not at.exception and not at.error
    assert "Queued jobs" in at.toast[0].value
    jobs = _jobs(cache_dir)[: len(_jobs(cache_dir)) - before]
    gt_job, model_job = sorted(jobs, key=lambda j: j.id)
    assert (gt_job.variant_name, gt_job.split, gt_job.status) == ("ground truth", "train", "queued")
    assert model_job.variant_name.startswith("ground truth → DeepLabV3+ (")
    assert (model_job.split, model_job.status, model_job.depends_on) == ("val", "queued", gt_job.id)
    assert at.selectbox(key="follow").value == model_job.variant_id  # the new training is followed
    assert any("waiting" in p.proto.text for p in at.get("progress"))

    sys.modules["__main__"] = MAIN  # AppTest left the page as __main__
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1, processes=1))
    assert {j.status for j in _jobs(cache_dir)} == {"done"}

    at.run()
    assert not at.exception and not at.error
    with connect(cache_dir, read_only=True) as con:
        (row,) = trainings(con, dataset_id, "val")
        log = queries.train_log(con, model_job.variant_id)
    assert row.variant_id == model_job.variant_id and row.images == 4
    # The comparison table: the training with its val mIoU and settings, as the engine reports them.
    table = next(f.value for f in at.dataframe if "val mIoU" in f.value.columns)
    assert list(table["label set"]) == ["ground truth"]
    assert list(table["val mIoU"]) == [row.miou] and not any(c.startswith("val mIoU +") for c in table.columns)
    assert (table["epochs"][0], table["crop"][0], table["batch"][0]) == (1, 128, 4)
    # The curves: every logged loss step, and one validation point (one epoch).
    losses = [r for r in log if r["name"] == "loss"]
    assert len(losses) == 2  # 8 images, batch 4
    loss = _figure(at, "Training loss")
    assert list(loss.data[0].x) == [r["step"] for r in losses]
    assert list(loss.data[0].y) == pytest.approx([r["value"] for r in losses])
    (val,) = [r for r in log if r["name"] == "val_miou"]
    assert list(_figure(at, "Validation mIoU (epoch ends)").data[0].y) == pytest.approx([100 * val["value"]])
    assert "job" in " ".join(c.value for c in at.caption) and "done" in " ".join(c.value for c in at.caption)
    # The bar chart and the heatmap hold the trained model only (not CAM, which has no val maps).
    figures = [plotly.io.from_json(chart.proto.spec) for chart in at.get("plotly_chart")]
    bars = next(f for f in figures if f.data and f.data[0].type == "bar")
    assert list(bars.data[0].x) == pytest.approx([row.miou])
    heat = next(f for f in figures if f.data and f.data[0].type == "heatmap")
    assert [y.split(" · ")[0] for y in heat.data[0].y] == [row.name]

    # Predict the train split with the same model: a label job of the same variant on train.
    assert at.selectbox(key="predict_split").value == "train"
    at.button(key="predict_submit").click().run()
    assert not at.exception and "Queued jobs" in at.toast[0].value
    newest = _jobs(cache_dir)[0]
    assert (newest.variant_id, newest.split, newest.status) == (row.variant_id, "train", "queued")
    at.button(key="predict_submit").click().run()  # a second click adds nothing
    assert _jobs(cache_dir)[0].id == newest.id


def test_bad_settings_and_label_sets_show_an_error(train_env, monkeypatch):
    cache_dir, _ = train_env
    before = _jobs(cache_dir)
    at = _page().run()
    at.selectbox(key="label_set").set_value("gt")
    _set_params(at, {"batch_size": 1})
    at.button(key="train_submit").click().run()
    assert not at.exception
    assert "batch_size >= 2" in at.error[0].value
    assert _jobs(cache_dir) == before  # not even the ground-truth label set was queued

    # An ISLE assignment listed when the page was drawn but gone when Train is clicked.
    monkeypatch.setattr(queries, "assignment_names", lambda con, dataset_id, split: [{"name": "gone"}])
    _set_params(at, {"batch_size": 8})
    at.run()
    at.selectbox(key="label_set").set_value("isle:gone")
    at.button(key="train_submit").click().run()
    assert not at.exception
    assert "no saved ISLE assignment 'gone' on train" in at.error[0].value
    assert _jobs(cache_dir) == before
