"""ISLE: Algorithm 2, the exact merge's overlap and "no absent class" rules on hand-built maps,
predicted vs exact counts, naive ISLE, subsets; then the real worker merging real variants, saved
assignment history, and an export that imports back as an identical variant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache.classes import VOC
from cache import queries
from cache.db import connect
from cache.labelmaps import read_label_map
from engine.core.chains import Step, dataset_id_for
from engine.isle import assignments
from engine.isle.export import ExportError, export_assignment, export_variant
from engine.isle.numerics import (
    Subset,
    absent_index,
    auto_assignment,
    drop_absent,
    merge_slices,
    naive_choice,
    precision_priority,
    predicted_counts,
)
from engine.methods.imported import import_step
from engine.ops.metrics import confusion_counts
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve

# --- Algorithm 2 -----------------------------------------------------------------------------


def _iou(rows: dict[int, list[float]], n: int) -> np.ndarray:
    iou = np.full((n, 21), np.nan)
    for c, values in rows.items():
        iou[:, c] = values
    return iou


def test_auto_assignment_picks_best_per_class_and_breaks_ties_by_miou_then_id():
    # 3 candidates; class 1: b best; class 2: a and c tie at 0.5 (c has the higher mIoU);
    # class 3: all tie at 0.2 with a, b at equal mIoU -> smaller id "a"; class 4: no image.
    iou = _iou({0: [0.9, 0.9, 0.9], 1: [0.1, 0.7, 0.3], 2: [0.5, 0.4, 0.5], 3: [0.2, 0.2, 0.2]}, 3)
    miou = np.array([0.4, 0.4, 0.45])
    auto = auto_assignment(iou, miou, ["a", "b", "c"], VOC)
    assert auto.choice[0] == -1  # background is never assigned
    assert auto.choice[1] == 1
    assert auto.choice[2] == 2 and auto.tied[2] == (2, 0)
    # class 3: c has the best mIoU, so it wins the three-way tie
    assert auto.choice[3] == 2 and auto.tied[3] == (2, 0, 1)
    assert 4 in auto.no_images and auto.choice[4] == 2  # fallback: best mIoU
    # the order candidates are listed in does not matter
    again = auto_assignment(iou[[2, 1, 0]], miou[[2, 1, 0]], ["c", "b", "a"], VOC)
    assert ["cba"[r] for r in again.choice[1:4]] == ["b", "c", "c"]


def test_auto_assignment_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected iou of shape"):
        auto_assignment(np.zeros((0, 21)), np.zeros(0), [], VOC)
    with pytest.raises(ValueError, match="2 candidates but 1 mIoUs"):
        auto_assignment(np.zeros((2, 21)), np.zeros(1), ["a", "b"], VOC)


def test_precision_priority_orders_classes_by_chosen_variant_precision():
    tp = np.zeros((2, 21), np.int64)
    fp = np.zeros((2, 21), np.int64)
    tp[0, 8], fp[0, 8] = 90, 10  # cat from variant 0: 0.9
    tp[1, 12], fp[1, 12] = 60, 40  # dog from variant 1: 0.6
    tp[0, 12], fp[0, 12] = 99, 1  # dog from variant 0 (not chosen): ignored
    choice = np.zeros(21, np.int64)
    choice[12] = 1
    priority = precision_priority(tp, fp, choice, VOC)
    assert priority[:2] == (8, 12)
    assert sorted(priority) == list(range(1, 21))


# --- the exact merge on hand-built maps ------------------------------------------------------

CAT, DOG, PERSON = 8, 12, 15


def _claims() -> dict[int, np.ndarray]:
    """A 3x4 image: cat claims columns 0-2, dog columns 2-3 (column 2 overlaps, 3 pixels)."""
    cat = np.zeros((3, 4), bool)
    cat[:, :3] = True
    dog = np.zeros((3, 4), bool)
    dog[:, 2:] = True
    return {CAT: cat, DOG: dog}


def test_score_rule_gives_an_overlap_pixel_to_the_higher_stored_score():
    cat_score = np.full((3, 4), 0.6, np.float32)
    dog_score = np.full((3, 4), 0.5, np.float32)
    dog_score[0, 2] = 0.9  # dog wins the top overlap pixel only
    scores = {CAT: cat_score, DOG: dog_score}
    label, conflicts = merge_slices(_claims(), [CAT, DOG], priority=[DOG, CAT], rule="score", score_of=scores.get, classes=VOC)
    expected = np.array([[CAT, CAT, DOG, DOG], [CAT, CAT, CAT, DOG], [CAT, CAT, CAT, DOG]], np.uint8)
    np.testing.assert_array_equal(label, expected)
    assert conflicts[CAT, DOG] == 2 and conflicts[DOG, CAT] == 1
    assert conflicts.sum() == 3  # one count per overlap pixel with two claimants


def test_precision_rule_gives_the_overlap_to_the_higher_priority_class():
    label, conflicts = merge_slices(_claims(), [CAT, DOG], priority=[DOG, CAT], rule="precision", classes=VOC)
    assert (label[:, 2] == DOG).all()
    assert conflicts[DOG, CAT] == 3 and conflicts.sum() == 3


def test_score_rule_falls_back_to_priority_where_a_variant_kept_no_scores_and_on_equal_scores():
    scores = {CAT: np.full((3, 4), 0.9, np.float32), DOG: None}
    label, conflicts = merge_slices(_claims(), [CAT, DOG], priority=[DOG, CAT], rule="score", score_of=scores.get, classes=VOC)
    assert (label[:, 2] == DOG).all() and conflicts[DOG, CAT] == 3
    equal = {CAT: np.full((3, 4), 0.5, np.float32), DOG: np.full((3, 4), 0.5, np.float32)}
    label, _ = merge_slices(_claims(), [CAT, DOG], priority=[CAT, DOG], rule="score", score_of=equal.get, classes=VOC)
    assert (label[:, 2] == CAT).all()


def test_a_class_absent_from_the_image_labels_never_enters_the_pseudo_label():
    claims = _claims()
    claims[PERSON] = np.ones((3, 4), bool)  # a variant claims person everywhere; the image has none
    label, conflicts = merge_slices(claims, [CAT, DOG], priority=[CAT, DOG, PERSON], rule="precision", classes=VOC)
    assert PERSON not in label
    assert conflicts[absent_index(VOC), PERSON] == 12
    assert conflicts[CAT, DOG] == 3  # the person claim took part in no overlap


def test_unclaimed_pixels_become_background_and_three_way_overlaps_count_each_pair():
    a = np.array([[1, 1, 0]], bool)
    b = np.array([[1, 1, 0]], bool)
    c = np.array([[1, 0, 0]], bool)
    label, conflicts = merge_slices({1: a, 2: b, 3: c}, [1, 2, 3], priority=[3, 2, 1], rule="precision", classes=VOC)
    np.testing.assert_array_equal(label, [[3, 2, 0]])
    assert conflicts[3, 1] == 1 and conflicts[3, 2] == 1 and conflicts[2, 1] == 1
    assert conflicts.sum() == 3


def test_merge_rejects_unknown_rule_and_mismatched_slices():
    with pytest.raises(ValueError, match="overlap rule"):
        merge_slices(_claims(), [CAT], [CAT], rule="sum", classes=VOC)
    with pytest.raises(ValueError, match="different shapes"):
        merge_slices({1: np.ones((2, 2), bool), 2: np.ones((3, 2), bool)}, [1, 2], [1, 2], classes=VOC)


def test_predicted_counts_match_the_exact_merge_up_to_the_pixels_lost_in_overlaps():
    """Two 1x6 images, two candidates; counts of the real merge vs the prediction from counts."""
    gt = [np.array([[0, CAT, CAT, CAT, 0, 0]], np.uint8), np.array([[DOG, DOG, 0, CAT, CAT, 0]], np.uint8)]
    # candidate 0 is good at cat, candidate 1 at dog
    v0 = [np.array([[0, CAT, CAT, CAT, CAT, 0]], np.uint8), np.array([[0, 0, 0, CAT, CAT, CAT]], np.uint8)]
    v1 = [np.array([[0, 0, CAT, 0, 0, 0]], np.uint8), np.array([[DOG, DOG, DOG, DOG, 0, 0]], np.uint8)]
    counts = np.zeros((2, 21, 3), np.int64)
    for v, maps in enumerate((v0, v1)):
        for g, m in zip(gt, maps):
            counts[v] += confusion_counts(g, m, VOC.num_classes)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    iou = tp / np.maximum(tp + fp + fn, 1)
    auto = auto_assignment(np.where(tp + fn > 0, iou, np.nan), iou.mean(axis=1), ["v0", "v1"], VOC)
    assert auto.choice[CAT] == 0 and auto.choice[DOG] == 1
    predicted = predicted_counts(tp, fp, fn, auto.choice, VOC)

    exact = np.zeros((21, 3), np.int64)
    lost = np.zeros(21, np.int64)
    labels = [(CAT,), (CAT, DOG)]
    for i, g in enumerate(gt):
        chosen = {CAT: v0[i], DOG: v1[i]}
        claims = {c: chosen[c] == c for c in labels[i]}
        label, conflicts = merge_slices(claims, labels[i], priority=[CAT, DOG], rule="precision", classes=VOC)
        exact += confusion_counts(g, label, VOC.num_classes)
        lost += conflicts.sum(axis=0)
    # Image 2 column 3: cat (v0) and dog (v1) both claim it, cat wins (priority): dog loses a FP.
    assert lost[DOG] == 1 and lost[CAT] == 0
    np.testing.assert_array_equal(exact[CAT], predicted[CAT])  # lost nothing: identical
    assert predicted[DOG, 1] - exact[DOG, 1] == 1 and exact[DOG, 0] == predicted[DOG, 0]
    # Background: predicted FN0 = every chosen class's FP (cat 2 + dog 2); one dog FP lies on
    # ground-truth cat (image 2, column 3), not on background, so the estimate is 1 too high.
    assert predicted[0, 2] == 4 and exact[0, 2] == 3
    assert exact[0, 0] + exact[0, 2] == predicted[0, 0] + predicted[0, 2]  # ground-truth background


def test_naive_isle_takes_the_top_ranked_class_and_drops_absent_classes():
    assert naive_choice([DOG, PERSON], ranking=[PERSON, CAT, DOG], best_for_class={PERSON: "p", DOG: "d"},
                        fallback="f") == "p"
    assert naive_choice([], ranking=[PERSON], best_for_class={PERSON: "p"}, fallback="f") == "f"
    label = np.array([[0, CAT, DOG, 255]], np.uint8)
    out, dropped = drop_absent(label, [CAT], VOC)
    np.testing.assert_array_equal(out, [[0, CAT, 0, 255]])
    assert dropped[DOG] == 1 and dropped.sum() == 1


def test_subset_split_is_stable_complementary_and_honours_exclusions():
    ids = [f"2008_{i:06d}" for i in range(400)]
    selection, report = Subset(0.25, seed=3).split(ids)
    assert sorted(selection + report) == ids and not set(selection) & set(report)
    assert 60 < len(selection) < 140
    assert Subset(0.25, seed=3).split(ids) == (selection, report)
    assert Subset(0.25, seed=4).split(ids)[0] != selection
    assert Subset().split(ids) == (ids, [])
    assert Subset(exclude=(ids[0],)).split(ids)[0] == ids[1:]
    with pytest.raises(ValueError, match="fraction"):
        Subset(0.0)


# --- the real worker on real images ----------------------------------------------------------


def _run(cache_dir: Path, root: Path, step: Step, processes: int = 1) -> str:
    submit_chain(cache_dir, root, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=processes))
    return assignments.step_variant_id(dataset_id_for(root), step)


def test_exact_merge_of_real_variants_agrees_with_the_prediction_up_to_conflicts(cache_copy):
    cache_dir, root, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        plan = assignments.build_plan(con, dataset_id, "train", candidates)
    # Overlaps: horse (13) from "GT grown" reaches into its neighbours person (15) and cow (10),
    # taken from "GT"; dog (12) from the CAM scores overlaps chair (9) from "GT grown".
    cam, _, gt, grown = candidates
    overrides = {13: grown, 15: gt, 10: gt, 12: cam, 9: grown}
    with connect(cache_dir, read_only=True) as con:
        plan = assignments.build_plan(con, dataset_id, "train", candidates, overrides=overrides)
    merged = _run(cache_dir, root, assignments.merge_step(plan, "test"), processes=2)  # spawned pool
    with connect(cache_dir, read_only=True) as con:
        plan = assignments.build_plan(con, dataset_id, "train", candidates, overrides=overrides)
        conflicts = queries.conflict_totals(con, merged)
        items = {r.image_id: r for r in queries.usable_images(con, dataset_id, "train")}
        rows = queries.label_map_rows(con, merged)
    exact = assignments.table_figures(plan.selection, merged)
    assert exact is not None and len(rows) == 8
    lost = assignments.lost_pixels(conflicts, VOC)
    assert lost.sum() > 0, "the overrides were meant to make overlapping slices"
    predicted = plan.predicted["selection"].counts
    for c in range(1, 21):
        # An object class keeps its chosen variant's counts except for pixels it lost.
        assert predicted[c, 0] - exact.counts[c, 0] >= 0
        assert (predicted[c, 0] - exact.counts[c, 0]) + (predicted[c, 1] - exact.counts[c, 1]) <= lost[c]
        if lost[c] == 0:
            np.testing.assert_array_equal(exact.counts[c], predicted[c])
    for image_id, (path, _) in rows.items():
        present_classes = set(np.unique(read_label_map(cache_dir / path)).tolist()) - {0, 255}
        assert present_classes <= set(items[image_id].labels)  # no absent class
    # Re-queuing the same assignment is a no-op: the variant is complete.
    assert submit_chain(cache_dir, root, "train", [assignments.merge_step(plan, "again")]) == []


def test_assignment_history_round_trip(cache_copy):
    cache_dir, root, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        auto = assignments.build_plan(con, dataset_id, "train", candidates, Subset(0.5, seed=1))
        present = next(c for c in range(1, 21) if auto.selection.n_images[:, c].max() > 0)
        other = next(v for v in candidates if v != auto.chosen(present))
        edited = assignments.build_plan(con, dataset_id, "train", candidates, Subset(0.5, seed=1),
                                        {present: other}, rule="precision")
    assert edited.overridden == (present,)
    with connect(cache_dir) as con:
        v1 = assignments.save(con, auto, "mine")
        v2 = assignments.save(con, edited, "mine", note="override")
        assignments.save(con, auto, "other")
    with connect(cache_dir, read_only=True) as con:
        history = [assignments.decode(r) for r in queries.assignment_history(con, dataset_id, "train", "mine")]
        restored = assignments.rebuild(con, dataset_id, "train", history[0])
        names = queries.assignment_names(con, dataset_id, "train")
    assert [h.id for h in history] == [v1, v2]
    assert history[1].choice[present] == other and history[1].rule == "precision"
    assert history[1].subset == Subset(0.5, seed=1) and history[1].auto == history[0].choice
    np.testing.assert_array_equal(restored.choice, auto.choice)
    assert restored.rule == "score" and restored.overridden == ()
    with connect(cache_dir) as con:  # restoring = saving the old version again
        v3 = assignments.save(con, restored, "mine", note=f"restored version {v1}")
    with connect(cache_dir, read_only=True) as con:
        latest = assignments.decode(queries.assignment_history(con, dataset_id, "train", "mine")[-1])
    assert latest.id == v3 and latest.choice == history[0].choice
    assert {n["name"]: n["versions"] for n in names} == {"mine": 2, "other": 1}


def test_export_reimports_as_an_identical_variant(cache_copy, tmp_path):
    cache_dir, root, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        plan = assignments.build_plan(con, dataset_id, "train", candidates)
    with connect(cache_dir) as con:
        version = assignments.save(con, plan, "auto")
        saved = assignments.decode(queries.get_assignment(con, version))
    dest = tmp_path / "export"
    with pytest.raises(ExportError, match="run it first"):
        export_assignment(cache_dir, dataset_id, "train", saved, dest)
    merged = _run(cache_dir, root, assignments.merge_step(plan, "auto"))
    done = export_assignment(cache_dir, dataset_id, "train", saved, dest)
    assert done.images == 8 and done.missing == []
    ids = (dest / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == 8 and all((dest / "JPEGImages" / f"{i}.jpg").is_file() for i in ids)
    provenance = json.loads((dest / "provenance.json").read_text())
    assert provenance["variant"]["id"] == merged
    details = provenance["details"]
    assert details["assignment"]["name"] == "auto" and details["rule"] == "score"
    assert [c["id"] for c in details["candidates"]] == candidates
    assert details["miou"]["selection"]["exact"] is not None
    assert len(details["classes"]) == 20
    assert details["assignment"]["rule"]["name"] == "algorithm2"
    off = details["off_sample"]  # beside the in-sample figures: cross-validation and confidence
    assert off["images"] == 8 and [f["rule"] for f in off["cv"]] == ["Algorithm 2", "stable (margin +0.0 pt)"]
    assert len(off["classes"]) == 20 and all(len(f["gains"]) == 5 for f in off["cv"])
    # Exporting over a foreign non-empty folder is refused; over a previous export it replaces it.
    with pytest.raises(ExportError, match="not empty"):
        export_variant(cache_dir, merged, root)
    assert export_variant(cache_dir, merged, dest, images="none").images == 8

    imported = _run(cache_dir, root, import_step(dest / "SegmentationClassAug", "re-import"))
    with connect(cache_dir, read_only=True) as con:
        original, again = queries.label_map_rows(con, merged), queries.label_map_rows(con, imported)
        counts = {v: {(r["class_id"], r["tp"], r["fp"], r["fn"]) for r in queries.class_counts(con, dataset_id, "train")
                      if r["variant_id"] == v} for v in (merged, imported)}
    assert original.keys() == again.keys()
    for image_id in original:
        np.testing.assert_array_equal(read_label_map(cache_dir / original[image_id][0]),
                                      read_label_map(cache_dir / again[image_id][0]))
    assert counts[merged] == counts[imported]


def test_a_corrupt_candidate_label_map_is_reported_by_name_and_the_rest_merges(cache_copy):
    cache_dir, root, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        plan = assignments.build_plan(con, dataset_id, "train", candidates)
        image = queries.usable_images(con, dataset_id, "train")[0]
        chosen = plan.chosen(image.labels[0])
        bad = cache_dir / queries.label_map_rows(con, chosen)[image.image_id][0]
    bad.write_bytes(b"not a png")
    step = assignments.merge_step(plan, "corrupt")
    job_ids = submit_chain(cache_dir, root, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(cache_dir, read_only=True) as con:
        errors = queries.image_errors(con, job_ids[-1])
        labelled = queries.labelled_in_split(con, dataset_id, "train")[assignments.step_variant_id(dataset_id, step)]
    assert [e["image_id"] for e in errors] == [image.image_id]
    assert str(bad) in errors[0]["message"] and "cannot decode" in errors[0]["message"]
    assert labelled == 7


def test_naive_isle_runs_as_a_variant(cache_copy):
    cache_dir, root, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        plan = assignments.build_plan(con, dataset_id, "train", candidates)
    naive = _run(cache_dir, root, assignments.naive_step(plan))
    with connect(cache_dir, read_only=True) as con:
        items = {r.image_id: r for r in queries.usable_images(con, dataset_id, "train")}
        rows = queries.label_map_rows(con, naive)
        summary = assignments.summary(con, assignments.build_plan(con, dataset_id, "train", candidates),
                                      naive_variant_id=naive)
    assert len(rows) == 8 and summary.miou.selection.naive is not None
    ranking = assignments.naive_step(plan).params["ranking"]
    for image_id, (path, _) in rows.items():
        labels = items[image_id].labels
        source = naive_choice(labels, ranking, {c: plan.candidates[plan.auto.choice[c]] for c in range(1, 21)},
                              plan.candidates[plan.best_single()])
        with connect(cache_dir, read_only=True) as con:
            expected, _ = drop_absent(read_label_map(cache_dir / queries.label_map_rows(con, source)[image_id][0]), labels, VOC)
        np.testing.assert_array_equal(read_label_map(cache_dir / path), expected)
