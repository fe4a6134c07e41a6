"""Cross-validated ISLE, the per-class bootstrap, the stable rule and the budget curve: on hand-built
counts worked out by hand, and on the real per-image counts of the worker's variants."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cache import reports
from cache.classes import ClassSet
from cache.db import connect
from engine.isle import assignments, validation
from engine.isle.numerics import Subset, auto_assignment, iou_of, predicted_counts

THREE = ClassSet(("background", "cat", "dog"))


def _image(counts_by_variant: list[list[tuple[int, int, int]]]) -> np.ndarray:
    """One image's ``(V, C, 3)`` counts from ``[[(tp, fp, fn) per class] per variant]``."""
    return np.array(counts_by_variant, np.int64)


def test_folds_deal_images_by_their_seeded_hash_round_robin():
    ids = [f"2007_{i:06d}" for i in range(10)]
    fold = validation.folds(ids, 3, seed=7)
    by_hash = sorted(ids, key=lambda i: hashlib.sha1(f"7:{i}".encode()).digest())
    assert {i: int(f) for i, f in zip(ids, fold)} == {i: n % 3 for n, i in enumerate(by_hash)}
    assert sorted(np.bincount(fold).tolist()) == [3, 3, 4]
    shuffled = ids[::-1]
    assert dict(zip(shuffled, validation.folds(shuffled, 3, seed=7).tolist())) == dict(zip(ids, fold.tolist()))
    with pytest.raises(ValueError, match="2 <= k <= 10"):
        validation.folds(ids, 11)


def test_resampled_iou_is_the_weighted_sum_of_the_images_counts():
    counts = np.stack([
        _image([[(90, 5, 5), (8, 2, 0), (0, 0, 0)], [(80, 10, 10), (4, 1, 5), (0, 0, 0)]]),
        _image([[(50, 0, 10), (0, 3, 0), (6, 0, 4)], [(55, 5, 0), (0, 0, 0), (9, 1, 0)]]),
    ])
    weights = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    iou = validation.resampled_iou(counts, weights)
    # Resample 0 draws image 0 twice: cat IoU of variant 0 = 16 / 20; dog held by no image: NaN.
    assert iou[0, 0, 1] == pytest.approx(16 / 20) and np.isnan(iou[0, :, 2]).all()
    # Resample 1 is both images once: variant 1 cat = 4 / 10, dog = 9 / 10.
    assert iou[1, 1, 1] == pytest.approx(4 / 10) and iou[1, 1, 2] == pytest.approx(9 / 10)
    # Resample 2 draws image 1 twice: its cat row is a false positive only, cat not held: NaN.
    assert np.isnan(iou[2, :, 1]).all() and iou[2, 0, 2] == pytest.approx(12 / 20)


def test_bootstrap_weights_draw_n_images_per_resample_with_replacement():
    weights = validation.bootstrap_weights(50, 200, seed=3)
    assert weights.shape == (200, 50) and (weights.sum(axis=1) == 50).all()
    assert (weights == 0).any(axis=1).mean() > 0.99  # about e^-1 of the images are left out
    np.testing.assert_array_equal(weights, validation.bootstrap_weights(50, 200, seed=3))


def test_confidence_interval_and_share_worked_out_by_hand():
    # Four resamples, two candidates; cat gains of candidate 0 over 1: 0.1, 0.3, -0.1, 0.5.
    iou = np.full((4, 2, 3), np.nan)
    iou[:, 0, 1] = [0.6, 0.7, 0.4, 0.9]
    iou[:, 1, 1] = [0.5, 0.4, 0.5, 0.4]
    choice = np.array([-1, 0, 1])
    conf = validation.confidence(iou, choice, THREE, level=0.5)
    assert conf.share[1, 1] == pytest.approx(0.75)
    np.testing.assert_allclose([conf.low[1, 1], conf.high[1, 1]], np.percentile([0.1, 0.3, -0.1, 0.5], [25, 75]))
    assert np.isnan(conf.share[1, 0]) and conf.rival(1) == 1 and conf.verdict(1) == "likely"
    assert conf.rival(2) is None and conf.verdict(2) == "no images"  # dog held by no resample
    iou[:, 1, 1] = 0.0
    iou[:, 0, 1] = 0.0  # both miss the class in every resample: a tie, not a coin flip
    assert validation.confidence(iou, choice, THREE).verdict(1) == "tied"
    iou[:, 0, 1] = [0.6, 0.7, 0.4, 0.9]
    iou[:, 1, 1] = iou[:, 0, 1] + [0.1, -0.1, 0.1, 0.1]
    assert validation.confidence(iou, choice, THREE).verdict(1) == "coin flip"  # wins 1 of 4


def test_stable_rule_leaves_the_best_single_only_above_the_margin():
    auto = np.array([-1, 1, 1])
    low = np.full((3, 2), np.nan)
    low[1, 0], low[2, 0] = 0.02, -0.01  # gain over candidate 0 (the best single): cat sure, dog not
    np.testing.assert_array_equal(validation.stable_choice(auto, 0, low, THREE, margin=0.0), [-1, 1, 0])
    np.testing.assert_array_equal(validation.stable_choice(auto, 0, low, THREE, margin=0.05), [-1, 0, 0])
    np.testing.assert_array_equal(validation.stable_choice(auto, 0, low, THREE, margin=-np.inf), auto)
    np.testing.assert_array_equal(validation.stable_choice(auto, 1, low, THREE, margin=0.0), auto)


def test_stable_rule_on_hand_built_images_keeps_a_consistent_winner_and_drops_a_lucky_one():
    # Candidate 0 has the better mIoU (the best single). Cat: candidate 1 wins on every image (a
    # consistent winner). Dog: candidate 1 wins overall only through one large image (lucky): a
    # resample without that image, about a third of them, has it lose.
    images = []
    for n in range(10):
        dog1 = (990, 0, 10) if n == 0 else (10, 0, 90)
        images.append(_image([[(900, 50, 50), (60, 20, 20), (50, 25, 25)],
                              [(500, 250, 250), (80, 10, 10), dog1]]))
    counts = np.stack(images)
    ids = ["a-first", "b-second"]
    np.testing.assert_array_equal(validation.algorithm2(ids, THREE)(counts), [-1, 1, 1])
    np.testing.assert_array_equal(validation.stable(ids, THREE, margin=0.0, resamples=500, seed=1)(counts), [-1, 1, 0])
    np.testing.assert_array_equal(validation.stable(ids, THREE, margin=-np.inf)(counts), [-1, 1, 1])
    # A margin above the cat's sure gain of 0.2 IoU sends it back to the best single too.
    np.testing.assert_array_equal(validation.stable(ids, THREE, margin=0.25, resamples=500)(counts), [-1, 0, 0])


def test_budget_curve_scores_each_draw_on_the_fixed_report_subset():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 200, size=(40, 2, 3, 3)).astype(np.int64)
    pool, report = counts[:30], counts[30:]
    ids = ["a", "b"]
    curve = validation.budget_curve(pool, report, {"Algorithm 2": validation.algorithm2(ids, THREE)}, ids, THREE,
                                    sizes=(5, None), draws=4, seed=2)
    assert curve.sizes.tolist() == [5, 30] and set(curve.miou) == {"Algorithm 2", "best single"}
    whole = validation.algorithm2(ids, THREE)(pool)
    sums, held = report.sum(axis=0), validation.present(report).sum(axis=0)
    expected = iou_of(predicted_counts(sums[..., 0], sums[..., 1], sums[..., 2], whole, THREE), held > 0)[1]
    np.testing.assert_allclose(curve.miou["Algorithm 2"][1], expected)  # all of the pool: one draw, repeated
    with pytest.raises(ValueError, match="report"):
        validation.budget_curve(pool, report[:0], {}, ids, THREE)


# --- real counts -------------------------------------------------------------------------------


def test_image_counts_sum_to_the_iou_table(cache_copy):
    cache_dir, _, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        data = reports.image_counts(con, dataset_id, "train", candidates)
        table = reports.select_rows(reports.iou_table(con, dataset_id, "train"), candidates)
    assert data.counts.shape == (8, 4, 21, 3)
    sums = data.counts.sum(axis=0)
    np.testing.assert_array_equal(sums[..., 0], table.tp)
    np.testing.assert_array_equal(sums[..., 1], table.fp)
    np.testing.assert_array_equal(sums[..., 2], table.fn)
    np.testing.assert_array_equal(validation.present(data.counts).sum(axis=0), table.n_images.max(axis=0))


def test_cross_validation_equals_a_plain_loop_over_the_counts_table(cache_copy):
    cache_dir, _, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        data = reports.image_counts(con, dataset_id, "train", candidates)
        fold = validation.folds(data.image_ids, 4, seed=0)
        cv = validation.cross_validate(data.counts, fold, validation.algorithm2(candidates, data.classes),
                                       candidates, data.classes)
        for f in range(4):
            # The plain way: the IoU table of each fold's images, aggregated by SQL from the rows.
            train = reports.select_rows(reports.iou_table(
                con, dataset_id, "train", [i for i, g in zip(data.image_ids, fold) if g != f]), candidates)
            test = reports.select_rows(reports.iou_table(
                con, dataset_id, "train", [i for i, g in zip(data.image_ids, fold) if g == f]), candidates)
            choice = auto_assignment(train.iou, train.miou, candidates, data.classes).choice
            best = validation.best_single(train.miou, candidates)
            counts = predicted_counts(test.tp, test.fp, test.fn, choice, data.classes)
            assert cv.isle[f] == pytest.approx(iou_of(counts, test.n_images.max(axis=0) > 0)[1])
            assert cv.single[f] == pytest.approx(test.miou[best])
            np.testing.assert_array_equal(cv.choices[f], choice)


def test_stable_plan_with_margin_minus_inf_is_algorithm2_and_saves_as_its_own_rule(cache_copy):
    cache_dir, root, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        auto = assignments.build_plan(con, dataset_id, "train", candidates)
        open_ = assignments.build_plan(con, dataset_id, "train", candidates,
                                       assign=assignments.AssignRule("stable", margin=-np.inf))
        stable = assignments.build_plan(con, dataset_id, "train", candidates,
                                        assign=assignments.AssignRule("stable", margin=0.0, resamples=300))
        checked = assignments.validate(con, stable, k=4, resamples=300)
    np.testing.assert_array_equal(open_.choice, auto.choice)
    best = stable.best_single()
    for c in stable.classes.foreground:  # the stable choice is Algorithm 2's or the best single
        assert stable.choice[c] in (auto.choice[c], best)
    assert stable.overridden == ()
    assert [f.rule for f in checked.cv] == ["Algorithm 2", "stable (margin +0.0 pt)"]
    assert checked.images == 8 and all(f.k == 4 and len(f.gains) == 4 for f in checked.cv)
    assert {c.verdict for c in checked.classes} <= {"sure", "likely", "coin flip", "tied", "no images"}
    with connect(cache_dir) as con:
        version = assignments.save(con, stable, "stable")
    with connect(cache_dir, read_only=True) as con:
        from cache import queries

        saved = assignments.decode(queries.get_assignment(con, version))
        restored = assignments.rebuild(con, dataset_id, "train", saved)
    assert saved.assign == stable.assign and restored.assign.name == "stable"
    np.testing.assert_array_equal(restored.choice, stable.choice)


def test_budget_curve_of_a_real_plan_needs_a_report_subset(cache_copy):
    cache_dir, _, dataset_id, candidates = cache_copy
    with connect(cache_dir, read_only=True) as con:
        whole = assignments.build_plan(con, dataset_id, "train", candidates)
        with pytest.raises(ValueError, match="report subset"):
            assignments.budget_curve(con, whole, draws=2)
        half = assignments.build_plan(con, dataset_id, "train", candidates, Subset(0.5, seed=0))
        rows = assignments.budget_curve(con, half, sizes=(1, 2, None), draws=3, resamples=100)
    pool = len(half.selection_ids)
    assert [r.n for r in rows] == sorted({1, 2, pool}) and rows[-1].spread["best single"] == 0.0
    assert set(rows[0].mean) == {"Algorithm 2", "stable (margin +0.0 pt)", "best single"}


def test_command_line_saves_a_stable_assignment_and_prints_the_off_sample_figures(cache_copy, capsys):
    from cache import queries
    from engine.runtime.cli import main

    cache_dir, root, dataset_id, candidates = cache_copy
    common = ["--cache", str(cache_dir), "--root", str(root)]
    main([*common, "isle", "--name", "steady", "--rule", "stable", "--cv", "4", "--overlap", "precision"])
    out = capsys.readouterr().out
    with connect(cache_dir, read_only=True) as con:
        (row,) = queries.assignment_history(con, dataset_id, "train", "steady")
        saved = assignments.decode(row)
        checked = assignments.validate(con, assignments.rebuild(con, dataset_id, "train", saved), k=4)
    assert saved.assign == assignments.AssignRule("stable") and saved.rule == "precision"
    assert "assignment 'steady' (stable (margin +0.0 pt)) saved" in out
    for f in checked.cv:
        assert f"4-fold cross-validated, {f.rule}: ISLE {f.isle:9.2f} vs best single {f.single:9.2f}, " \
               f"gain {f.gain:+.2f} ± {f.spread:.2f}" in out
    assert f"in-sample gain of ISLE over the best single: {checked.in_sample_gain:+.2f}" in out
    assert sum(c.verdict in out for c in checked.classes) >= 1

    main([*common, "isle", "--fraction", "0.5", "--budget-curve", "--draws", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("labelled-budget curve: chosen on n of the")
    assert "Algorithm 2" in lines[1] and "best single" in lines[1] and len(lines) >= 3
    with pytest.raises(SystemExit, match="report subset"):
        main([*common, "isle", "--budget-curve"])
