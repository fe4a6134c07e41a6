"""Diagnostics from cached counts: the threshold sweep, per-class thresholds, the sparse class
confusion, the 255 protocol, and the command line that prints them.

Hand-built score maps first (counts worked out on paper), then real VOC images through the real
worker: a CAM variant's sweep at a threshold equals, pixel for pixel, the counts of the CAM
variant labelled at that threshold, and every variant's confusion cells sum to its counts.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cache import diagnostics, queries
from cache.classes import IGNORE_INDEX
from cache.db import connect
from cache.labelmaps import read_label_map
from engine.core.chains import Step, dataset_id_for
from engine.core.dataset import read_mask
from engine.ops.cams import cams_to_label
from engine.ops.metrics import confusion_counts
from engine.ops.sweep import confusion_pairs, label_at, peak, sweep_counts
from engine.runtime import cli
from engine.runtime.jobs import submit_chain, threshold_step
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import TINY_CAM

# 2x3 image, classes 1 (cat-like) and 2 at scores worked out by hand; class count 3.
GT = np.array([[0, 1, 1],
               [2, 2, 255]], np.uint8)
CAMS = np.array([[[0.10, 0.50, 0.20],   # class 1
                  [0.00, 0.30, 0.90]],
                 [[0.05, 0.40, 0.25],   # class 2
                  [0.60, 0.35, 0.10]]], np.float32)


def test_peak_takes_the_best_class_and_its_score():
    score, best = peak(CAMS, (1, 2))
    np.testing.assert_array_equal(best, [[1, 1, 2], [2, 2, 1]])
    np.testing.assert_allclose(score, [[0.10, 0.50, 0.25], [0.60, 0.35, 0.90]])


def test_sweep_counts_by_hand():
    score, best = peak(CAMS, (1, 2))
    sweep = sweep_counts(GT, score, best, (0.2, 0.45), 3)
    # t = 0.2: labels [[0, 1, 2], [2, 2, ignored]]
    #   background: TP 1 (0,0); FP 0; FN 0. class 1: TP 1 (0,1); FP 0; FN 1 ((0,2) -> 2).
    #   class 2: TP 2; FP 1 ((0,2), gt 1, not background: fp_bg 0); FN 0.
    np.testing.assert_array_equal(sweep[0], [[1, 0, 0, 0], [1, 0, 1, 0], [2, 1, 0, 0]])
    # t = 0.45: labels [[0, 1, 0], [2, 0, ignored]]
    #   background: TP 1, FP 2 ((0,2) gt 1, (1,1) gt 2), FN 0. class 1: TP 1, FN 1. class 2: TP 1, FN 1.
    np.testing.assert_array_equal(sweep[1], [[1, 2, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]])


def test_a_background_pixel_taken_by_a_class_is_its_fp_bg():
    gt = np.array([[0, 0, 1]], np.uint8)
    cams = np.array([[[0.9, 0.2, 0.8]]], np.float32)
    sweep = sweep_counts(gt, *peak(cams, (1,)), (0.1, 0.5), 2)
    np.testing.assert_array_equal(sweep[0], [[0, 0, 2, 0], [1, 2, 0, 2]])  # both background pixels taken
    np.testing.assert_array_equal(sweep[1], [[1, 0, 1, 0], [1, 1, 0, 1]])


def test_sweep_rows_equal_the_labels_at_each_threshold_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 16, 2)
        classes = tuple(sorted(rng.choice(np.arange(1, 6), rng.integers(0, 4), replace=False).tolist()))
        cams = (rng.integers(0, 13, (len(classes), h, w)) / 20).astype(np.float32)  # ties on the grid
        gt = rng.integers(0, 6, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = IGNORE_INDEX
        grid = (0.05, 0.15, 0.3, 0.45, 0.6)
        sweep = sweep_counts(gt, *peak(cams, classes), grid, 6)
        for j, t in enumerate(grid):
            np.testing.assert_array_equal(sweep[j, :, :3], confusion_counts(gt, cams_to_label(cams, classes, t), 6))


def test_per_class_thresholds_give_background_from_fp_bg():
    rng = np.random.default_rng(1)
    grid = (0.1, 0.3, 0.5)
    for _ in range(30):
        cams = rng.random((3, 9, 9)).astype(np.float32)
        gt = rng.integers(0, 4, (9, 9)).astype(np.uint8)
        score, best = peak(cams, (1, 2, 3))
        sweep = sweep_counts(gt, score, best, grid, 4)
        choice = rng.integers(0, len(grid), 4)
        rows = sweep[choice, np.arange(4)]
        expected = confusion_counts(gt, label_at(score, best, np.array(grid, np.float32)[choice]), 4)
        np.testing.assert_array_equal(rows[1:, :3], expected[1:])
        background = diagnostics.background_counts(rows, int((gt == 0).sum()), int((gt > 0).sum()))
        np.testing.assert_array_equal(background, expected[0])


def test_confusion_pairs_by_hand_and_255_as_miss_or_ignored():
    pred = np.array([[0, 1, 255],
                     [1, 2, 2]], np.uint8)
    pairs = confusion_pairs(GT, pred, 3)
    np.testing.assert_array_equal(pairs, [[0, 0, 1], [1, 1, 1], [1, 255, 1], [2, 1, 1], [2, 2, 1]])
    counts = confusion_counts(GT, pred, 3)
    np.testing.assert_array_equal(counts, [[1, 0, 0], [1, 1, 1], [1, 0, 1]])  # the 255 is a miss of class 1
    undecided = np.array([0, 1, 0])
    tp, fp, fn, coverage = diagnostics.apply_undecided(counts[:, 0], counts[:, 1], counts[:, 2], undecided, "ignore")
    np.testing.assert_array_equal(fn, [0, 0, 1])
    assert coverage == pytest.approx(4 / 5)  # 5 valid pixels, 1 undecided
    assert diagnostics.metric_values(tp, fp, fn, "iou")[1] == pytest.approx(1 / 2)  # ignored: TP 1, FP 1
    assert diagnostics.metric_values(*counts.T, "iou")[1] == pytest.approx(1 / 3)  # as a miss


def test_metrics_by_hand():
    tp, fp, fn = np.array([6, 0]), np.array([2, 0]), np.array([4, 0])
    assert diagnostics.metric_values(tp, fp, fn, "precision")[0] == pytest.approx(0.75)
    assert diagnostics.metric_values(tp, fp, fn, "recall")[0] == pytest.approx(0.6)
    assert diagnostics.metric_values(tp, fp, fn, "fp share")[0] == pytest.approx(2 / 12)
    assert diagnostics.metric_values(tp, fp, fn, "fn share")[0] == pytest.approx(4 / 12)
    assert np.isnan(diagnostics.metric_values(tp, fp, fn, "iou")[1])
    with pytest.raises(ValueError, match="unknown metric"):
        diagnostics.metric_values(tp, fp, fn, "dice")


def _table(counts: np.ndarray, thresholds=(0.1, 0.3, 0.5)) -> diagnostics.SweepTable:
    from cache.classes import ClassSet

    classes = ClassSet(("background", "a", "b"), background=0)
    truth = counts[0, :, 0] + counts[0, :, 2]
    return diagnostics.SweepTable("v", classes, np.array(thresholds), counts, (truth > 0).astype(np.int64),
                                  int(truth[0]), int(truth[1:].sum()))


def test_per_class_best_and_tune_by_hand():
    # per threshold (rows) and class: TP, FP, FN, fp_bg. Class a is best at 0.1, class b at 0.5;
    # 100 background pixels, 20 of a, 10 of b.
    counts = np.array([
        [[60, 2, 40, 0], [18, 30, 2, 30], [9, 20, 1, 10]],
        [[80, 6, 20, 0], [14, 10, 6, 10], [8, 10, 2, 10]],
        [[95, 12, 5, 0], [8, 0, 12, 0], [7, 5, 3, 5]],
    ], np.int64)
    table = _table(counts)
    iou = table.metric("iou")
    np.testing.assert_allclose(iou[:, 1], [18 / 50, 14 / 30, 8 / 20])
    assert diagnostics.best_threshold(table) == int(np.argmax(table.miou))
    best = diagnostics.per_class_best(table)
    assert best[1] == 1 and best[2] == 2  # a: 14/30 at 0.3; b: 7/15 at 0.5
    at = table.at(best)
    # background: 100 - (10 + 5) taken = 85 TP; FN 15; FP = 30 object pixels - (14 + 10 - 10) - (7 + 5 - 5) = 9
    np.testing.assert_array_equal(at[0], [85, 9, 15])
    tuned = diagnostics.tune(table, table, 0.3)
    assert tuned.default == 1
    np.testing.assert_allclose(tuned.thresholds[1:], [0.3, 0.5])
    assert tuned.selection_miou[2] >= tuned.selection_miou[1] >= tuned.selection_miou[0] - 1e-12
    with pytest.raises(ValueError, match="not on the grid"):
        diagnostics.tune(table, table, 0.25)


# --- real images through the real worker ----------------------------------------------------


@pytest.fixture(scope="module")
def swept(baseline_cache, tmp_path_factory):
    """A copy of the baseline cache (tiny CAM at 0.3 and CAM -> dCRF on 8 real train images)
    plus CAM labelled again at 0.15 and 0.45 (the same trained model)."""
    cache_dir, root = baseline_cache
    copy = tmp_path_factory.mktemp("swept") / "cache"
    shutil.copytree(cache_dir, copy)
    for t in (0.15, 0.45):
        submit_chain(copy, root, "train", [Step("cam", {**TINY_CAM, "bg_threshold": t})])
    serve(WorkerConfig(copy, until_idle=True, poll_seconds=0.1))
    dataset_id = dataset_id_for(root)
    with connect(copy, read_only=True) as con:
        by_threshold = {v.params["bg_threshold"]: v for v in queries.variants(con, dataset_id) if v.step == "cam"}
    return copy, root, dataset_id, by_threshold


def _counts(con, variant_id: str) -> dict:
    rows = con.execute("SELECT image_id, class_id, tp, fp, fn FROM counts WHERE variant_id = ?", [variant_id]).fetchall()
    return {(i, c): (tp, fp, fn) for i, c, tp, fp, fn in rows}


def _sweep_at(con, variant_id: str, threshold: float) -> dict:
    rows = con.execute("SELECT image_id, class_id, tp, fp, fn FROM sweep_counts WHERE variant_id = ? AND threshold = ?",
                       [variant_id, threshold]).fetchall()
    return {(i, c): (tp, fp, fn) for i, c, tp, fp, fn in rows}


def test_a_sweep_equals_the_variants_labelled_at_its_thresholds(swept):
    cache_dir, _, dataset_id, by_threshold = swept
    assert set(by_threshold) == {0.15, 0.3, 0.45}
    with connect(cache_dir, read_only=True) as con:
        for t, variant in by_threshold.items():
            counts = _counts(con, variant.id)
            assert counts and sum(v[0] for v in counts.values()) > 0
            for source in by_threshold.values():  # every CAM variant records the same sweep
                assert _sweep_at(con, source.id, t) == counts, (t, source.params["bg_threshold"])
        # the CAM variants have a sweep, dCRF none: its label is no threshold of its scores
        swept_ids = set(queries.swept_variants(con, dataset_id))
        dcrf = {v.id for v in queries.variants(con, dataset_id) if v.step == "dcrf"}
        assert {v.id for v in by_threshold.values()} <= swept_ids and dcrf and not dcrf & swept_ids


def test_confusion_sums_equal_the_counts_on_real_images(swept):
    cache_dir, root, dataset_id, _ = swept
    with connect(cache_dir, read_only=True) as con:
        variants = queries.variants(con, dataset_id)
        rows = queries.class_counts(con, dataset_id, "train")
        assert {v.step for v in variants} == {"cam", "dcrf"}
        for variant in variants:
            matrix = diagnostics.confusion_matrix(con, dataset_id, "train", variant.id)
            mine = {r["class_id"]: (r["tp"], r["fp"], r["fn"]) for r in rows if r["variant_id"] == variant.id}
            summed = matrix.counts()
            for class_id in range(summed.shape[0]):
                assert tuple(summed[class_id]) == mine.get(class_id, (0, 0, 0)), (variant.name, class_id)
        # one image decoded: its cells are the label map's
        cam = next(v for v in variants if v.step == "cam")
        image = queries.usable_images(con, dataset_id, "train")[0]
        path = cache_dir / queries.label_map_rows(con, cam.id)[image.image_id][0]
        cells = con.execute("SELECT gt, pred, pixels FROM confusion WHERE variant_id = ? AND image_id = ? "
                            "ORDER BY gt, pred", [cam.id, image.image_id]).fetchall()
    gt = read_mask(image.mask_path, (image.height, image.width))
    assert [tuple(r) for r in confusion_pairs(gt, read_label_map(path), 21).tolist()] == cells


def test_per_class_thresholds_make_the_variant_the_sweep_predicts(swept):
    cache_dir, root, dataset_id, by_threshold = swept
    source = by_threshold[0.3]
    with connect(cache_dir, read_only=True) as con:
        table = diagnostics.sweep_table(con, dataset_id, "train", source.id)
        dcrf = next(v for v in queries.variants(con, dataset_id) if v.step == "dcrf")
    chosen = np.array([1, 0, 2] * 7, np.int64)[:21]  # threshold indices into the grid, per class
    step = threshold_step(source, class_thresholds=[float(table.thresholds[j]) for j in chosen[1:]])
    submit_chain(cache_dir, root, "train", [step])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1))
    expected = table.at(chosen)
    with connect(cache_dir, read_only=True) as con:
        made = next(v for v in queries.variants(con, dataset_id) if v.params.get("class_thresholds"))
        rows = {r["class_id"]: (r["tp"], r["fp"], r["fn"]) for r in queries.class_counts(con, dataset_id, "train")
                if r["variant_id"] == made.id}
    for class_id in range(21):
        assert rows.get(class_id, (0, 0, 0)) == tuple(expected[class_id]), class_id
    with pytest.raises(ValueError, match="threshold sweep"):
        threshold_step(dcrf, 0.2)


def test_the_command_line_prints_the_sweep_the_confusion_and_other_metrics(swept, capsys):
    cache_dir, root, dataset_id, by_threshold = swept
    base = ["--cache", str(cache_dir), "--dataset", str(root)]
    source = by_threshold[0.3]
    cli.main([*base, "sweep", source.id, "--fraction", "0.5"])
    out = capsys.readouterr().out
    with connect(cache_dir, read_only=True) as con:
        table = diagnostics.sweep_table(con, dataset_id, "train", source.id)
    assert f"{0.45:9.2f} {100 * table.miou[8]:5.1f}" in out
    assert "chosen on the selection subset" in out and "protocol: split list train" in out
    cli.main([*base, "confusion", source.id, "--matrix"])
    out = capsys.readouterr().out
    assert "labelled as" in out and "row-normalised" in out
    cli.main([*base, "status", "--metric", "recall"])
    out = capsys.readouterr().out
    with connect(cache_dir, read_only=True) as con:
        rows = [r for r in queries.class_counts(con, dataset_id, "train") if r["variant_id"] == source.id]
        dcrf = next(v for v in queries.variants(con, dataset_id) if v.step == "dcrf")
    recall = [r["tp"] / (r["tp"] + r["fn"]) for r in rows if r["tp"] + r["fn"] > 0]
    assert f"mean recall={100 * np.mean(recall):.2f}" in out
    with pytest.raises(SystemExit, match="no threshold sweep"):
        cli.main([*base, "sweep", dcrf.id])


def test_recount_restores_the_confusion_of_a_variant_made_before_schema_8(baseline_cache, tmp_path, capsys):
    cache_dir, root = baseline_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    dataset_id = dataset_id_for(root)
    with connect(copy) as con:
        dcrf = next(v for v in queries.variants(con, dataset_id) if v.step == "dcrf")
        before = con.execute("SELECT image_id, gt, pred, pixels FROM confusion WHERE variant_id = ? ORDER BY ALL",
                             [dcrf.id]).fetchall()
        counts = _counts(con, dcrf.id)
        images = sorted({r[0] for r in before})
        # as an older cache: no confusion rows for 5 of the 8 images (the other 3 count as done)
        con.execute("DELETE FROM confusion WHERE variant_id = ? AND image_id IN (SELECT unnest(?))", [dcrf.id, images[:5]])
    base = ["--cache", str(copy), "--dataset", str(root)]
    cli.main([*base, "recount", dcrf.id])
    assert "queued job" in capsys.readouterr().out
    with connect(copy, read_only=True) as con:
        after = con.execute("SELECT image_id, gt, pred, pixels FROM confusion WHERE variant_id = ? ORDER BY ALL",
                            [dcrf.id]).fetchall()
        assert after == before and _counts(con, dcrf.id) == counts
        job = con.execute("SELECT status, total FROM jobs WHERE kind = 'recount'").fetchone()
    assert job == ("done", 5)
    cli.main([*base, "recount", dcrf.id])
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no variant"):
        cli.main([*base, "recount", "0123456789ab"])


def test_the_grid_is_a_worker_parameter(baseline_cache, tmp_path):
    cache_dir, root = baseline_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    submit_chain(copy, root, "train", [Step("cam", {**TINY_CAM, "bg_threshold": 0.2})])
    cli.main(["--cache", str(copy), "--dataset", str(root), "--sweep-grid", "0.2,0.4", "worker", "--until-idle"])
    with connect(copy, read_only=True) as con:
        variant = next(v for v in queries.variants(con, dataset_id_for(root)) if v.params.get("bg_threshold") == 0.2)
        table = diagnostics.sweep_table(con, dataset_id_for(root), "train", variant.id)
        counts = _counts(con, variant.id)
        assert _sweep_at(con, variant.id, 0.2) == counts
    np.testing.assert_array_equal(table.thresholds, [0.2, 0.4])
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--sweep-grid", "0.3,1.5", "status"])


def test_a_figure_names_its_protocol_ground_truth_folder_and_split_list(tmp_path):
    """The ground-truth folder is chosen per dataset (a description file naming SegmentationClass
    over the same VOCdevkit), the split list per figure (a variant made on one list is counted on
    any list holding its images), and each figure's protocol says which."""
    from PIL import Image

    from cache import reports
    from cache.labelmaps import write_label_map
    from engine.methods.imported import import_step
    from tests.conftest import _split_ids, make_voc_copy

    ids = _split_ids("train")[:6]
    root = make_voc_copy(tmp_path / "voc", {"train_aug": ids, "train": ids[:3]})
    (root / "SegmentationClass").mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    for image_id in ids:
        mask = np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        # SegmentationClass here: the borders (255) of the Aug masks labelled background
        Image.fromarray(np.where(mask == 255, 0, mask).astype(np.uint8)).save(root / "SegmentationClass" / f"{image_id}.png")
        write_label_map(labels / f"{image_id}.png", np.where(mask == 255, 0, mask).astype(np.uint8))
    description = tmp_path / "voc-segmentationclass.toml"
    description.write_text(f'root = "{root}"\nclasses = "voc"\nimages = "JPEGImages/{{id}}.jpg"\n'
                           'masks = "SegmentationClass/{id}.png"\n'
                           '[splits.train_aug]\nlist = "ImageSets/Segmentation/train_aug.txt"\n')
    cache_dir = tmp_path / "cache"
    for dataset in (root, description):
        submit_chain(cache_dir, dataset, "train_aug", [import_step(labels, "borders as background")])
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(cache_dir, read_only=True) as con:
        aug = dataset_id_for(root)
        plain = dataset_id_for(description)
        aug_caption = diagnostics.protocol(con, aug, "train_aug", 6).caption
        plain_caption = diagnostics.protocol(con, plain, "train_aug", 6).caption
        aug_table = reports.iou_table(con, aug, "train_aug")
        plain_table = reports.iou_table(con, plain, "train_aug")
        on_train = reports.iou_table(con, aug, "train")
        per_image = {i: c for i, c in
                     ((r[0], r[1:]) for r in con.execute(
                         "SELECT image_id, sum(tp), sum(fp) FROM counts WHERE variant_id = ? GROUP BY image_id",
                         [aug_table.variant_ids[0]]).fetchall())}
    assert "ground truth SegmentationClassAug" in aug_caption and "split list train_aug (6 images" in aug_caption
    assert "ground truth voc/SegmentationClass," in plain_caption
    # against SegmentationClass the label is the ground truth itself; against Aug the borders are ignored
    assert plain_table.fp[0].sum() == 0 and plain_table.fn[0].sum() == 0
    assert aug_table.tp[0].sum() < plain_table.tp[0].sum()
    # the variant made on train_aug, counted on the train list: its 3 images only
    assert on_train.labelled.tolist() == [3]
    assert on_train.tp[0].sum() == sum(per_image[i][0] for i in ids[:3])
