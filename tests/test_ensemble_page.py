"""The ISLE ensemble page, driven by AppTest over the cache the real worker filled (CAM and
CAM -> dCRF on 8 real train images): Algorithm 2's choice, overrides and the predicted IoU, the
per-class bootstrap confidence and the cross-validated gain, the stable rule, saved versions and
their restore, the exact merge run by the real worker, and the export."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cache import queries
from cache.classes import VOC
from cache.db import connect
from cache.labelmaps import write_label_map
from engine.core.chains import dataset_id_for
from engine.isle import assignments
from engine.isle.assignments import AssignRule
from engine.isle.numerics import Subset
from tests.conftest import REPO, grown_mask

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


@pytest.fixture
def patchy_env(writable_env, tmp_path):
    """``(cache_dir, root, [GT grown id, patchy id])``: the writable baseline plus two imported
    candidates (no scores): "GT grown" (the ground truth grown by 7 pixels) and "patchy", the same
    except that one image with two object classes is the exact ground truth and one other class is
    missing everywhere. Patchy is the worse single candidate and wins that image's classes by the
    luck of one image, which the bootstrap sees: the stable rule keeps GT grown for them."""
    from engine.methods.imported import import_step
    from engine.runtime.jobs import submit_chain
    from engine.runtime.worker import WorkerConfig, serve

    cache_dir, root = writable_env
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    masks = {i: np.asarray(Image.open(root / "SegmentationClassAug" / f"{i}.png")) for i in ids}
    held = {i: set(np.unique(m).tolist()) & set(OBJECT_CLASSES) for i, m in masks.items()}
    lucky = next(i for i in ids if len(held[i]) >= 2)
    dropped = next(c for c in OBJECT_CLASSES if c not in held[lucky] and any(c in h for h in held.values()))

    def patchy(image_id: str, mask: np.ndarray) -> np.ndarray:
        if image_id == lucky:
            return np.where(mask == 255, 0, mask).astype(np.uint8)
        grown = grown_mask(mask)
        return np.where(grown == dropped, 0, grown).astype(np.uint8)

    for name, transform in (("GT grown", lambda _, m: grown_mask(m)), ("patchy", patchy)):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        for image_id, mask in masks.items():
            write_label_map(folder / f"{image_id}.png", transform(image_id, mask))
        submit_chain(cache_dir, root, "train", [import_step(folder, name)])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(cache_dir, read_only=True) as con:
        complete = assignments.complete_variants(con, dataset_id_for(root), "train")
    by_name = {c.variant.name: c.variant.id for c in complete}
    return cache_dir, root, [by_name["GT grown"], by_name["patchy"]]


def _page() -> AppTest:
    return AppTest.from_file(str(REPO / "app_pages" / "ensemble.py"), default_timeout=60)


def _direct_plan(cache_dir, root, overrides=None, candidates=None, assign=AssignRule()) -> assignments.Plan:
    """What the engine computes on the same cache, without the page (default: every default candidate)."""
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        if candidates is None:
            candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train") if c.default]
        return assignments.build_plan(con, dataset_id, "train", candidates, overrides=overrides, assign=assign)


def _validate(cache_dir, plan: assignments.Plan) -> assignments.Validation:
    with connect(cache_dir, read_only=True) as con:
        return assignments.validate(con, plan, k=5)


def _signed(value: float, decimals: int = 2) -> str:
    """A signed figure as the page prints it (a true minus sign)."""
    return f"{value:+.{decimals}f}".replace("-", "\u2212")


def _choices(at: AppTest) -> dict[int, str]:
    return {c: at.selectbox(key=f"choice_{c}").value for c in OBJECT_CLASSES}


def _cells(at: AppTest, class_id: int) -> list[str]:
    """The markdown texts of a class's row of the assignment table (7 columns: class, chips,
    automatic choice, chosen variant, confidence, predicted IoU, exact IoU)."""
    columns = list(at.columns)
    header = next(i for i, col in enumerate(columns)
                  if any(m.value == "**Predicted IoU**" for m in col.markdown))
    start = header - 5 + 7 * class_id
    return [" ".join(m.value for m in col.markdown) for col in columns[start:start + 7]]


def _assert_validation_shown(at: AppTest, checked: assignments.Validation, rule: AssignRule) -> None:
    """Each class row's confidence and the cross-validated figures are ``checked``'s."""
    for conf in checked.classes:
        cell = _cells(at, conf.class_id)[4]
        assert conf.verdict in cell and ("⚠" in cell) == (conf.verdict == "coin flip")
        if conf.rival is not None:
            assert f"wins {conf.share:.0%} vs {conf.rival_name}, " \
                   f"{_signed(conf.low, 1)} to {_signed(conf.high, 1)}" in cell
    cv = next(f for f in checked.cv if f.rule == rule.label())
    assert _metric(at, "ISLE gain, cross-validated (k = 5)") == f"{_signed(cv.gain)} ± {cv.spread:.2f}"
    assert _metric(at, "ISLE gain, in-sample") == _signed(checked.in_sample_gain)
    table = next(f.value for f in at.dataframe if "best single" in f.value.columns)
    stable = rule if rule.name == "stable" else AssignRule("stable")
    assert list(table["assignment rule"]) == [f.rule for f in checked.cv] == ["Algorithm 2", stable.label()]
    assert list(table["ISLE"]) == [f.isle for f in checked.cv]
    assert list(table["best single"]) == [f.single for f in checked.cv]
    assert list(table["gain"]) == [f"{_signed(f.gain)} ± {f.spread:.2f}" for f in checked.cv]


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
        assert cells[5] == expected and cells[6] == "—"  # no exact merge yet
        for k, variant_id in enumerate(plan.candidates, start=1):  # every chip's hover: IoU, precision, recall
            precision, recall = entry.candidate_precision[variant_id], entry.candidate_recall[variant_id]
            assert (f"precision {'—' if precision is None else f'{precision:.2f}'}, "
                    f"recall {'—' if recall is None else f'{recall:.2f}'}") in cells[1]
    row = plan.selection.variant_ids.index(plan.candidates[0])
    sel = plan.selection
    cat = VOC.names.index("cat")
    tp, fp, fn = sel.tp[row, cat], sel.fp[row, cat], sel.fn[row, cat]
    assert next(e for e in summary.classes if e.class_id == cat).candidate_precision[plan.candidates[0]] == \
        pytest.approx(100 * tp / (tp + fp), abs=0.005)
    assert _metric(at, "ISLE predicted") == f"{summary.miou.selection.predicted:.2f}"
    assert _metric(at, "Best single candidate") == f"{summary.miou.selection.best_single:.2f}"
    assert _metric(at, "ISLE exact") == "—" and _metric(at, "Naive ISLE") == "—"
    # A class absent from the 8 images says so instead of showing an IoU.
    empty = next(e for e in summary.classes if not e.images)
    assert "no images in the selection subset" in " ".join(c.value for c in at.caption)
    assert _cells(at, empty.class_id)[5] == "—"
    assert "no images" in _cells(at, empty.class_id)[4]


def test_rows_show_each_classs_confidence_and_the_gain_cross_validated(app_env):
    cache_dir, root = app_env
    at = _page().run()
    assert not at.exception
    _assert_validation_shown(at, _validate(cache_dir, _direct_plan(cache_dir, root)), AssignRule())


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
    assert cells[5] == f"{100 * iou[other, c]:.2f}"
    overridden = _direct_plan(cache_dir, root, {c: plan.candidates[other]})
    assert overridden.overridden == (c,)
    assert _metric(at, "ISLE predicted") == f"{100 * overridden.predicted['selection'].miou:.2f}" != before
    _assert_validation_shown(at, _validate(cache_dir, overridden), AssignRule())  # of the overridden choice
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
    table = next(f.value for f in at.dataframe if "differs from Algorithm 2" in f.value.columns)
    assert list(table["id"]) == [first.id, second.id]
    assert list(table["differs from Algorithm 2"]) == ["—", VOC.name(c)]

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
            assert _cells(at, entry.class_id)[6].startswith(f"{entry.exact_iou.selection:.2f} (")
            assert f"{abs(delta):.2f})" in _cells(at, entry.class_id)[6]

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


def test_two_sessions_saving_one_name_both_get_versions_and_the_second_is_told(writable_env):
    """No lost update: two page sessions open, each overrides a different class and saves under
    the same name; both versions are stored with their own choice, and the later saver is told
    that another session saved meanwhile."""
    cache_dir, root = writable_env
    plan = _direct_plan(cache_dir, root)
    first_class, second_class = [c for c in OBJECT_CLASSES if plan.selection.n_images[:, c].max() > 0][:2]
    sessions = [_page().run(), _page().run()]
    for at, c in zip(sessions, (first_class, second_class)):
        at.text_input(key="assignment_name").input("team").run()
        at.selectbox(key=f"choice_{c}").set_value(plan.candidates[1 - plan.auto.choice[c]]).run()
    one, two = sessions
    one.button(key="save_assignment").click().run()
    assert not one.exception and "Saved 'team' version 1" in one.success[0].value and not one.info
    two.button(key="save_assignment").click().run()
    assert not two.exception and "Saved 'team' version 2" in two.success[0].value
    with connect(cache_dir, read_only=True) as con:
        history = queries.assignment_history(con, dataset_id_for(root), "train", "team")
    first, second = (assignments.decode(r) for r in history)
    assert any(f"another session saved 'team' as id(s) {first.id}" in i.value for i in two.info)
    auto = {c: plan.candidates[plan.auto.choice[c]] for c in OBJECT_CLASSES}
    assert first.choice == {**auto, first_class: plan.candidates[1 - plan.auto.choice[first_class]]}
    assert second.choice == {**auto, second_class: plan.candidates[1 - plan.auto.choice[second_class]]}
    one.button(key="save_assignment").click().run()  # session one again: it is told about version 2 only
    assert "Saved 'team' version 3" in one.success[0].value
    assert any(f"as id(s) {second.id};" in i.value for i in one.info)


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
    assert _cells(at, c)[5].endswith(f" / {100 * plan.predicted['report'].iou[c]:.2f}")

    # The labelled-budget curve, on demand: the engine's rows, one line per rule.
    at.button(key="budget").click().run()
    assert not at.exception
    with connect(cache_dir, read_only=True) as con:
        rows = assignments.budget_view(con, dataset_id, "train", tuple(candidates), Subset(0.5, seed), 0.0, 20)
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert [t["name"] for t in traces] == list(rows[0].mean)
    assert [t["y"] for t in traces] == [[r.mean[name] for r in rows] for name in rows[0].mean]
    assert [t["x"] for t in traces] == [[r.n for r in rows]] * len(traces)


def test_restore_brings_back_candidates_subset_and_rule(writable_env):
    cache_dir, root = writable_env
    plan = _direct_plan(cache_dir, root)
    at = _page().run()
    at.radio(key="subset_mode").set_value("fraction").run()
    at.slider(key="fraction").set_value(0.3)
    at.number_input(key="seed").set_value(7)
    at.radio(key="rule").set_value("precision").run()
    at.radio(key="assign_rule").set_value("stable").run()
    at.number_input(key="assign_margin").set_value(1.5).run()
    choice = _choices(at)
    at.button(key="save_assignment").click().run()
    assert not at.exception and "Saved 'auto' version 1" in at.success[0].value
    # Change everything, then restore.
    at.radio(key="subset_mode").set_value("whole")
    at.radio(key="rule").set_value("score")
    at.radio(key="assign_rule").set_value("algorithm2")
    at.multiselect(key="candidates").set_value(plan.candidates[:1]).run()
    assert set(_choices(at).values()) == {plan.candidates[0]}
    at.button(key="restore").click().run()
    assert not at.exception and "Restored 'auto'" in at.success[0].value
    assert at.multiselect(key="candidates").value == plan.candidates
    assert at.radio(key="subset_mode").value == "fraction" and at.radio(key="rule").value == "precision"
    assert at.slider(key="fraction").value == 0.3 and at.number_input(key="seed").value == 7
    assert at.radio(key="assign_rule").value == "stable" and at.number_input(key="assign_margin").value == 1.5
    assert _choices(at) == choice
    with connect(cache_dir, read_only=True) as con:
        (row,) = queries.assignment_history(con, dataset_id_for(root), "train", "auto")
    saved = assignments.decode(row)
    assert (saved.subset.fraction, saved.subset.seed, saved.rule) == (0.3, 7, "precision")
    assert saved.assign == AssignRule("stable", margin=0.015)


def test_the_stable_rule_chooses_as_the_engine_and_its_saved_assignment_merges_exactly(patchy_env):
    from engine.runtime.worker import WorkerConfig, serve

    cache_dir, root, candidates = patchy_env
    dataset_id = dataset_id_for(root)
    auto = _direct_plan(cache_dir, root, candidates=candidates)
    stable = _direct_plan(cache_dir, root, candidates=candidates, assign=AssignRule("stable"))
    moved = [c for c in OBJECT_CLASSES if stable.choice[c] != auto.choice[c]]
    assert moved and stable.overridden == ()  # the rule matters on these candidates

    at = _page().run()
    at.multiselect(key="candidates").set_value(candidates).run()
    assert _choices(at) == {c: auto.chosen(c) for c in OBJECT_CLASSES}
    at.radio(key="assign_rule").set_value("stable").run()
    assert not at.exception
    assert _choices(at) == {c: stable.chosen(c) for c in OBJECT_CLASSES}
    assert not any("overridden" in _cells(at, c)[0] for c in OBJECT_CLASSES)
    for c in moved:  # the automatic choice names the rule's pick and Algorithm 2's
        assert f"(Algorithm 2: {auto.names[auto.choice[c]]})" in " ".join(x.value for x in at.caption)
    _assert_validation_shown(at, _validate(cache_dir, stable), stable.assign)
    assert _metric(at, "ISLE predicted") == f"{100 * stable.predicted['selection'].miou:.2f}"

    at.text_input(key="assignment_name").input("stable").run()
    at.button(key="save_assignment").click().run()
    assert not at.exception and "Saved 'stable' version 1" in at.success[0].value
    with connect(cache_dir, read_only=True) as con:
        (row,) = queries.assignment_history(con, dataset_id, "train", "stable")
    saved = assignments.decode(row)
    assert saved.assign == AssignRule("stable") and saved.choice == {c: stable.chosen(c) for c in OBJECT_CLASSES}
    table = next(f.value for f in at.dataframe if "differs from Algorithm 2" in f.value.columns)
    assert list(table["assignment rule"]) == [AssignRule("stable").label()]

    at.button(key="run_merge").click().run()
    assert not at.exception
    merge_id = assignments.step_variant_id(dataset_id, assignments.merge_step(stable, "stable"))
    sys.modules["__main__"] = MAIN  # see test_save_restore_merge_and_export
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    at.run()
    assert not at.exception
    with connect(cache_dir, read_only=True) as con:
        summary = assignments.summary(con, assignments.rebuild(con, dataset_id, "train", saved), merge_id)
    miou = summary.miou.selection
    assert miou.exact is not None
    assert _metric(at, "ISLE exact") == f"{miou.exact:.2f}" and _metric(at, "ISLE predicted") == f"{miou.predicted:.2f}"
    for entry in summary.classes:
        cells = _cells(at, entry.class_id)
        assert cells[5] == ("—" if entry.predicted_iou.selection is None else f"{entry.predicted_iou.selection:.2f}")
        if entry.exact_iou.selection is not None:
            delta = entry.exact_iou.selection - entry.predicted_iou.selection
            assert cells[6] == f"{entry.exact_iou.selection:.2f} ({_signed(delta)})"
