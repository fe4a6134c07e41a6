"""The ISLE ensemble page, driven by AppTest over the cache the real worker filled (CAM and
CAM -> dCRF on 8 real train images): Algorithm 2's choice, overrides and the predicted IoU, saved
versions and their restore, the exact merge run by the real worker, and the export."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cache import queries
from cache.classes import VOC
from cache.db import connect
from engine.core.chains import dataset_id_for
from engine.isle import assignments
from engine.isle.numerics import Subset
from tests.conftest import REPO

OBJECT_CLASSES = VOC.foreground  # the baseline cache is a VOC dataset
MAIN = sys.modules["__main__"]  # pytest's, before any AppTest run replaced it


@pytest.fixture
def app_env(baseline_cache, monkeypatch):
    cache_dir, root = baseline_cache
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    # AppTest runs the page as __main__; restore it for processes the worker spawns later.
    monkeypatch.setitem(sys.modules, "__main__", MAIN)
    return cache_dir, root


@pytest.fixture
def writable_env(app_env, tmp_path, monkeypatch):
    """A copy of the baseline cache (label map paths are relative to it), for tests that write."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(app_env[0], cache_dir)
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    return cache_dir, app_env[1]


def _page() -> AppTest:
    return AppTest.from_file(str(REPO / "app_pages" / "ensemble.py"), default_timeout=60)


def _direct_plan(cache_dir, root, overrides=None) -> assignments.Plan:
    """What the engine computes on the same cache, without the page."""
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train") if c.default]
        return assignments.build_plan(con, dataset_id, "train", candidates, overrides=overrides)


def _choices(at: AppTest) -> dict[int, str]:
    return {c: at.selectbox(key=f"choice_{c}").value for c in OBJECT_CLASSES}


def _cells(at: AppTest, class_id: int) -> list[str]:
    """The markdown texts of a class's row of the assignment table (6 columns)."""
    columns = list(at.columns)
    header = next(i for i, col in enumerate(columns)
                  if any(m.value == "**Predicted IoU**" for m in col.markdown))
    start = header - 4 + 6 * class_id
    return [" ".join(m.value for m in col.markdown) for col in columns[start:start + 6]]


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_rows_show_algorithm_2s_choice_and_the_predicted_figures(app_env):
    cache_dir, root = app_env
    at = _page().run()
    assert not at.exception
    plan = _direct_plan(cache_dir, root)
    assert len(plan.candidates) == 2 and at.multiselect(key="candidates").value == plan.candidates
    assert _choices(at) == {c: plan.candidates[plan.auto.choice[c]] for c in OBJECT_CLASSES}
    with connect(cache_dir, read_only=True) as con:
        summary = assignments.summary(con, plan)
    for entry in summary.classes:
        cells = _cells(at, entry.class_id)
        assert cells[0].startswith(f"{entry.class_name} ({entry.images})")
        assert "overridden" not in cells[0]
        expected = "—" if entry.predicted_iou.selection is None else f"{entry.predicted_iou.selection:.2f}"
        assert cells[4] == expected and cells[5] == "—"  # no exact merge yet
    assert _metric(at, "ISLE predicted") == f"{summary.miou.selection.predicted:.2f}"
    assert _metric(at, "Best single candidate") == f"{summary.miou.selection.best_single:.2f}"
    assert _metric(at, "ISLE exact") == "—" and _metric(at, "Naive ISLE") == "—"
    # A class absent from the 8 images says so instead of showing an IoU.
    empty = next(e for e in summary.classes if not e.images)
    assert "no images in the selection subset" in " ".join(c.value for c in at.caption)
    assert _cells(at, empty.class_id)[4] == "—"


def test_an_override_shows_the_other_candidates_iou_at_once(app_env):
    cache_dir, root = app_env
    plan = _direct_plan(cache_dir, root)
    iou = plan.selection.iou[[plan.selection.variant_ids.index(v) for v in plan.candidates]]
    # A class with images on which the two candidates differ.
    c = next(c for c in OBJECT_CLASSES if not np.isnan(iou[:, c]).any() and iou[0, c] != iou[1, c])
    other = 1 - plan.auto.choice[c]
    at = _page().run()
    before = _metric(at, "ISLE predicted")
    at.selectbox(key=f"choice_{c}").set_value(plan.candidates[other]).run()
    assert not at.exception
    cells = _cells(at, c)
    assert "overridden" in cells[0]
    assert cells[4] == f"{100 * iou[other, c]:.2f}"
    overridden = _direct_plan(cache_dir, root, {c: plan.candidates[other]})
    assert overridden.overridden == (c,)
    assert _metric(at, "ISLE predicted") == f"{100 * overridden.predicted['selection'].miou:.2f}" != before
    # Picking the automatic choice again is no override any more.
    at.selectbox(key=f"choice_{c}").set_value(plan.candidates[plan.auto.choice[c]]).run()
    assert "overridden" not in _cells(at, c)[0] and _metric(at, "ISLE predicted") == before


def test_save_restore_merge_and_export(writable_env, tmp_path):
    from engine.runtime.worker import WorkerConfig, serve

    cache_dir, root = writable_env
    dataset_id = dataset_id_for(root)
    plan = _direct_plan(cache_dir, root)
    auto = _choices(_page().run())
    c = next(c for c in OBJECT_CLASSES if plan.selection.n_images[:, c].max() > 0)
    other = plan.candidates[1 - plan.auto.choice[c]]

    at = _page().run()
    at.text_input(key="assignment_name").input("mine").run()
    at.button(key="save_assignment").click().run()
    assert not at.exception and "Saved 'mine' version 1" in at.success[0].value
    at.selectbox(key=f"choice_{c}").set_value(other).run()
    at.text_input(key="assignment_note").input(f"{VOC.name(c)} by hand").run()
    at.button(key="save_assignment").click().run()
    assert "Saved 'mine' version 2" in at.success[0].value
    with connect(cache_dir, read_only=True) as con:
        history = queries.assignment_history(con, dataset_id, "train", "mine")
    first, second = (assignments.decode(r) for r in history)
    assert first.choice == auto and second.choice == {**auto, c: other}
    assert second.note == f"{VOC.name(c)} by hand" and second.auto == auto
    assert second.candidates == plan.candidates and second.rule == "score" and second.subset.fraction == 1.0
    table = next(f.value for f in at.dataframe if "overridden" in f.value.columns)
    assert list(table["id"]) == [first.id, second.id]
    assert list(table["overridden"]) == ["—", VOC.name(c)]

    # Restore version 1, then version 2: each choice comes back exactly.
    at.selectbox(key="restore_version").set_value(first.id).run()
    at.button(key="restore").click().run()
    assert not at.exception and _choices(at) == first.choice
    assert "overridden" not in _cells(at, c)[0]
    at.selectbox(key="restore_version").set_value(second.id).run()
    at.button(key="restore").click().run()
    assert _choices(at) == second.choice and "overridden" in _cells(at, c)[0]

    # Export needs the merge; the page says so instead of failing.
    at.button(key="export").click().run()
    assert "run it first" in at.error[0].value

    at.button(key="run_merge").click().run()
    at.button(key="run_naive").click().run()
    assert not at.exception
    merge_id = assignments.step_variant_id(dataset_id, assignments.merge_step(
        _direct_plan(cache_dir, root, {c: other}), "mine"))
    with connect(cache_dir, read_only=True) as con:
        jobs = {j.variant_id: j for j in queries.recent_jobs(con)}
    assert jobs[merge_id].status == "queued" and jobs[merge_id].variant_name == "ISLE (mine)"
    assert any(j.variant_name == "naive ISLE" and j.status == "queued" for j in jobs.values())

    # AppTest left the page as __main__: the worker's spawned processes would re-run it.
    sys.modules["__main__"] = MAIN
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    at.run()
    assert not at.exception
    with connect(cache_dir, read_only=True) as con:
        summary = assignments.summary(con, assignments.rebuild(con, dataset_id, "train", second), merge_id)
    miou = summary.miou.selection
    assert miou.exact is not None
    assert _metric(at, "ISLE exact") == f"{miou.exact:.2f}" and _metric(at, "Naive ISLE") != "—"
    for entry in summary.classes:
        if entry.exact_iou.selection is not None:
            delta = entry.exact_iou.selection - entry.predicted_iou.selection
            assert _cells(at, entry.class_id)[5].startswith(f"{entry.exact_iou.selection:.2f} (")
            assert f"{abs(delta):.2f})" in _cells(at, entry.class_id)[5]

    dest = tmp_path / "export"
    at.text_input(key="export_dest").input(str(dest)).run()
    at.radio(key="export_images").set_value("none").run()
    at.button(key="export").click().run()
    assert not at.exception and not at.error
    assert f"Exported 8 image(s) to {dest}" in at.success[0].value
    provenance = json.loads((dest / "provenance.json").read_text())
    assert provenance["variant"]["id"] == merge_id
    assert provenance["details"]["assignment"]["id"] == second.id
    assert provenance["details"]["classes"][c - 1]["variant"] == other
    assert len(list((dest / "SegmentationClassAug").glob("*.png"))) == 8
    assert not (dest / "JPEGImages").exists()


def test_a_seeded_fraction_selects_and_the_rest_reports(app_env):
    cache_dir, root = app_env
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        ids = [r.image_id for r in queries.usable_images(con, dataset_id, "train")]
    seed = next(s for s in range(50) if all(Subset(0.5, s).split(ids)))  # both subsets non-empty
    selection, report = Subset(0.5, seed).split(ids)
    at = _page().run()
    at.radio(key="subset_mode").set_value("fraction").run()
    at.number_input(key="seed").set_value(seed).run()
    assert not at.exception and at.slider(key="fraction").value == 0.5
    assert f"Selection subset: {len(selection)} image(s); report subset: {len(report)} image(s)" in \
        " ".join(c.value for c in at.caption)
    with connect(cache_dir, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train") if c.default]
        plan = assignments.build_plan(con, dataset_id, "train", candidates, Subset(0.5, seed))
    assert _choices(at) == {c: plan.candidates[plan.auto.choice[c]] for c in OBJECT_CLASSES}
    predicted = [m.value for m in at.metric if m.label == "ISLE predicted"]
    assert predicted == [f"{100 * plan.predicted[k].miou:.2f}" for k in ("selection", "report")]
    c = next(c for c in OBJECT_CLASSES if not np.isnan(plan.predicted["report"].iou[c]))
    assert _cells(at, c)[4].endswith(f" / {100 * plan.predicted['report'].iou[c]:.2f}")


def test_restore_brings_back_candidates_subset_and_rule(writable_env):
    cache_dir, root = writable_env
    plan = _direct_plan(cache_dir, root)
    at = _page().run()
    at.radio(key="subset_mode").set_value("fraction").run()
    at.slider(key="fraction").set_value(0.3)
    at.number_input(key="seed").set_value(7)
    at.radio(key="rule").set_value("precision").run()
    choice = _choices(at)
    at.button(key="save_assignment").click().run()
    assert not at.exception and "Saved 'auto' version 1" in at.success[0].value
    # Change everything, then restore.
    at.radio(key="subset_mode").set_value("whole")
    at.radio(key="rule").set_value("score")
    at.multiselect(key="candidates").set_value(plan.candidates[:1]).run()
    assert set(_choices(at).values()) == {plan.candidates[0]}
    at.button(key="restore").click().run()
    assert not at.exception and "Restored 'auto'" in at.success[0].value
    assert at.multiselect(key="candidates").value == plan.candidates
    assert at.radio(key="subset_mode").value == "fraction" and at.radio(key="rule").value == "precision"
    assert at.slider(key="fraction").value == 0.3 and at.number_input(key="seed").value == 7
    assert _choices(at) == choice
    with connect(cache_dir, read_only=True) as con:
        (row,) = queries.assignment_history(con, dataset_id_for(root), "train", "auto")
    saved = assignments.decode(row)
    assert (saved.subset.fraction, saved.subset.seed, saved.rule) == (0.3, 7, "precision")
