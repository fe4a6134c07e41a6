"""engine/methods/svm.py: sampling, confident regions and z-scores by hand, then both plugins on real images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cache.classes import VOC
from cache.labelmaps import write_label_map, write_scores
from engine.core import registry
from engine.core.dataset import read_mask
from engine.core.registry import Role
from engine.core.types import Item, RunContext, SourceVariant
from engine.ops.backbone import load_feature_extractor, to_input
from engine.ops.scores import resize_channels
from engine.ops.svm import (
    LAYERS,
    SVMConfig,
    balanced_sample,
    confident_regions,
    eroded_regions,
    layer_features,
    softmax_scores,
    svm_expand,
    zscore,
)
from engine.refine.svm import SVMSeedConfig
from tests.conftest import split_items

TINY = {"n_samples": 200}  # fewer samples per class than the default 500; the rest as configured


# --- numerics worked out by hand ----------------------------------------------------------------


def test_balanced_sample_counts_per_class_by_hand():
    # 4x5 map: background 0 on 11 pixels, cat 8 on 5, dog 12 on 2, ignore 255 on 2.
    label = np.array([[0, 0, 0, 0, 0],
                      [0, 0, 0, 8, 8],
                      [0, 0, 0, 8, 8],
                      [12, 12, 255, 255, 8]], dtype=np.uint8)
    idx, y = balanced_sample(label, 4, np.random.default_rng(0))
    # n = 4: background and cat give 4 each; dog has only 2 pixels and gives both; 255 gives none.
    assert y.dtype == np.uint8 and idx.dtype == np.int64
    assert [int((y == c).sum()) for c in (0, 8, 12, 255)] == [4, 4, 2, 0]
    assert list(y) == [0] * 4 + [8] * 4 + [12] * 2  # grouped by class id
    assert np.array_equal(label.ravel()[idx], y)  # every index points at a pixel of its class
    assert np.unique(idx).size == idx.size  # without replacement
    assert set(idx[y == 12]) == {15, 16}  # all of the small class: flat indices of row 3, cols 0-1
    # Seeded: the same generator seed draws the same pixels; another seed other pixels.
    again, _ = balanced_sample(label, 4, np.random.default_rng(0))
    assert np.array_equal(idx, again)
    assert any(not np.array_equal(idx, balanced_sample(label, 4, np.random.default_rng(s))[0]) for s in (1, 2, 3))
    # n larger than every class: all 18 labelled pixels, 255 still excluded.
    idx, y = balanced_sample(label, 100, np.random.default_rng(0))
    assert idx.size == 18 and not np.isin(idx, [17, 18]).any()
    # Nothing to sample.
    idx, y = balanced_sample(np.full((2, 2), 255, np.uint8), 4, np.random.default_rng(0))
    assert idx.size == 0 and y.size == 0


def test_confident_regions_by_hand():
    # Scores of (background, cat 8, dog 12, bird 3) on a 2x3 image; bird is not an image label.
    background = np.full((2, 3), 0.3, np.float32)  # CAM's constant: never read
    cat = np.array([[0.9, 0.5, 0.1], [0.6, 0.0, 0.7]], np.float32)
    dog = np.array([[0.2, 0.1, 0.15], [0.3, 0.05, 0.8]], np.float32)
    bird = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
    scores = np.stack([background, cat, dog, bird])
    out = confident_regions(scores, (0, 8, 12, 3), allowed=(0, 8, 12), fg_threshold=0.6, bg_threshold=0.2)
    # (0,0) cat 0.9 >= 0.6 -> 8; (0,1) top 0.5 is between -> 255; (0,2) top 0.15 <= 0.2 -> 0;
    # (1,0) cat 0.6 = threshold -> 8; (1,1) top 0.05 -> 0; (1,2) dog 0.8 beats cat 0.7 -> 12.
    # Bird (1.0 everywhere) is not allowed and changes nothing.
    expected = np.array([[8, 255, 0], [8, 0, 12]], np.uint8)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    # No allowed foreground channel: the whole image is a background sample.
    assert not confident_regions(scores, (0, 8, 12, 3), allowed=(0,), fg_threshold=0.6, bg_threshold=0.2).any()
    with pytest.raises(ValueError, match=r"\(4, H, W\)"):
        confident_regions(scores[:3], (0, 8, 12, 3), (0, 8), 0.6, 0.2)
    with pytest.raises(ValueError, match="bg_threshold < fg_threshold"):
        SVMSeedConfig(fg_threshold=0.2, bg_threshold=0.3)


def test_eroded_regions_by_hand():
    label = np.zeros((5, 6), np.uint8)
    label[1:4, 1:4] = 8  # a 3x3 cat square
    label[:, 5] = 3  # a class that is not an image label
    label[4, 0] = 255
    out = eroded_regions(label, allowed=(0, 8), erode_px=1)
    expected = np.full((5, 6), 255, np.uint8)
    expected[2, 2] = 8  # one erosion step leaves the centre of the square
    # Background keeps a pixel only if its 4 neighbours are background too, the image border
    # counting as background (border_value=1): only the corner (0,0). (0,1)-(0,3) and (1,0)-(3,0)
    # touch the cat, (0,4) touches class 3, (4,1)-(4,4) the cat or class 3.
    expected[0, 0] = 0
    assert np.array_equal(out, expected)
    assert np.array_equal(eroded_regions(label, (0, 8), 0), np.where(np.isin(label, (0, 8)), label, 255))


def test_zscore_by_hand():
    x = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]], np.float32)
    z = zscore(x)
    # Channel 0: mean 2.5, population std sqrt(1.25) = 1.1180 -> -1.3416, -0.4472, 0.4472, 1.3416.
    s = math.sqrt(1.25)
    np.testing.assert_allclose(z[0], [[-1.5 / s, -0.5 / s], [0.5 / s, 1.5 / s]], rtol=1e-6)
    assert z.dtype == np.float32 and not z[1].any()  # a constant channel becomes 0, not NaN
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        zscore(np.zeros((2, 2), np.float32))


def test_softmax_scores_by_hand():
    decision = np.array([[0.0, 1.0], [math.log(3.0), 1.0]], np.float32)  # (K=2, 2 pixels)
    np.testing.assert_allclose(softmax_scores(decision), [[0.25, 0.5], [0.75, 0.5]], rtol=1e-6)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_svm_separates_two_and_three_classes_and_predicts_only_sampled_classes(kernel):
    # Feature: -1 on the left third, 0 in the middle, +1 on the right third; a noise channel.
    rng = np.random.default_rng(0)
    x = np.repeat([-1.0, 0.0, 1.0], 4)[None, None, :].repeat(6, axis=1)  # (1, 6, 12)
    features = np.concatenate([x, 0.01 * rng.standard_normal((1, 6, 12))]).astype(np.float32)
    truth = np.repeat(np.array([0, 8, 12], np.uint8), 4)[None].repeat(6, axis=0)
    # Binary: only background and dog labelled (a few pixels each); the cat column is unsampled.
    two = np.full((6, 12), 255, np.uint8)
    two[:, :2], two[:, 10:] = 0, 12
    label, decision, classes = svm_expand(features, two, 5, np.random.default_rng(0), kernel)
    assert classes == (0, 12) and decision.shape == (2, 6, 12)
    assert set(np.unique(label)) <= {0, 12}  # cat was never sampled, so it is never predicted
    assert np.array_equal(label[:, :4], truth[:, :4]) and np.array_equal(label[:, 8:], truth[:, 8:])
    np.testing.assert_allclose(decision[0], -decision[1])  # one binary margin, as (-d, d)
    # Three classes, every column sampled: exact recovery.
    label, decision, classes = svm_expand(features, truth, 10, np.random.default_rng(0), kernel)
    assert classes == (0, 8, 12) and np.array_equal(label, truth)
    # One class: that class everywhere; nothing sampled: all 255.
    one = np.where(truth == 8, 8, 255).astype(np.uint8)
    label, decision, classes = svm_expand(features, one, 10, np.random.default_rng(0), kernel)
    assert classes == (8,) and (label == 8).all()
    label, _, classes = svm_expand(features, np.full((6, 12), 255, np.uint8), 10, np.random.default_rng(0), kernel)
    assert classes == () and (label == 255).all()


def test_layers_are_the_backbone_resolution_levels(voc_root: Path):
    """F1-F5 sit at strides 2-32 (timm feature_info), and features come out at image size, z-scored."""
    extractor = load_feature_extractor("efficientnet_lite0", output_stride=32)
    info = {f"F{k + 1}": p["reduction"] for k, p in enumerate(extractor.model.feature_info)}
    assert {name: stride for name, (_, stride) in LAYERS.items()} == info
    rgb = np.zeros((37, 50, 3), np.uint8)
    rgb[:, 25:] = 255
    x = to_input(rgb)[None]
    for name, (count, stride) in LAYERS.items():
        y = x
        for stage in extractor.stages[:count]:
            y = stage(y)
        assert y.shape[2:] == (math.ceil(37 / stride), math.ceil(50 / stride)), name
    feats = layer_features(rgb, "F3")
    assert feats.shape == (40, 37, 50) and feats.dtype == np.float32
    live = feats.reshape(40, -1).std(axis=1) > 0
    np.testing.assert_allclose(feats.reshape(40, -1).mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(feats.reshape(40, -1)[live].std(axis=1), 1, rtol=1e-3)
    rgb_feats = layer_features(rgb, "rgb")
    np.testing.assert_allclose(rgb_feats[:, 0, :2], [[-1, -1]] * 3)  # half black, half white: -1 / +1
    with pytest.raises(ValueError, match="layer must be one of"):
        SVMConfig(layer="F6")


# --- the registered plugins on real images ------------------------------------------------------


def _miou(label: np.ndarray, gt: np.ndarray, classes: tuple[int, ...]) -> float:
    valid = gt != 255
    return float(np.mean([((label == c) & (gt == c) & valid).sum() / (((label == c) | (gt == c)) & valid).sum()
                          for c in classes]))


def test_oracle_plugin_on_real_images_and_bad_files(tiny_voc: Path, tmp_path: Path):
    """GROUND TRUTH samples (the paper's upper bound): the SVM must nearly reproduce the mask."""
    plugin = registry.get("svm-oracle")
    assert plugin.role is Role.ORACLE and "ground truth" in plugin.title
    items = split_items(tiny_voc, "train", 3)
    broken_jpg = tmp_path / "broken.jpg"
    data = items[0].image_path.read_bytes()
    broken_jpg.write_bytes(data[: len(data) // 2])
    broken = Item("broken", broken_jpg, items[0].mask_path, items[0].labels, items[0].height, items[0].width)
    no_mask = Item("no_mask", items[1].image_path, tmp_path / "missing.png", items[1].labels,
                   items[1].height, items[1].width)
    unlabelled = tmp_path / "all_ignore.png"
    write_label_map(unlabelled, np.full((items[2].height, items[2].width), 255, np.uint8))
    nothing = Item("nothing", items[2].image_path, unlabelled, items[2].labels, items[2].height, items[2].width)
    todo = [items[0], broken, items[1], no_mask, nothing, items[2]]
    ctx = RunContext(classes=VOC, items=todo, todo=todo, workdir=tmp_path / "work", processes=2)
    results = list(plugin.run(plugin.make_config(TINY), ctx))
    assert [r.image_id for r in results] == [it.image_id for it in todo]
    by_id = {r.image_id: r for r in results}
    assert by_id["broken"].label is None and str(broken_jpg) in by_id["broken"].error
    assert by_id["no_mask"].label is None and str(tmp_path / "missing.png") in by_id["no_mask"].error
    assert by_id["nothing"].label is None and str(unlabelled) in by_id["nothing"].error
    for item in items:
        r, gt = by_id[item.image_id], read_mask(item.mask_path)
        classes = (0, *item.labels)
        assert r.error is None and r.label.shape == gt.shape and r.label.dtype == np.uint8
        assert set(np.unique(r.label)) <= set(classes)
        scale = 128 / max(gt.shape)  # long side 128, e.g. 375x500 -> 96x128
        assert r.score_classes == classes
        assert r.scores.shape == (len(classes), round(gt.shape[0] * scale), round(gt.shape[1] * scale))
        np.testing.assert_allclose(r.scores.astype(np.float32).sum(axis=0), 1.0, atol=0.01)
        assert _miou(r.label, gt, classes) > 0.6, item.image_id


@pytest.fixture
def seed_source(voc_root: Path, tmp_path: Path):
    """Items and a coarse source variant: ground truth block-averaged over 32x32 (like a CAM),
    stored as scores (with a bogus extra class 3 scoring 1 everywhere) and as label maps."""
    items = split_items(voc_root, "train", 3)
    truth = {}
    for item in items:
        gt = read_mask(item.mask_path)
        classes = (0, *item.labels)
        h, w = gt.shape[0] // 32, gt.shape[1] // 32
        onehot = np.stack([gt == c for c in classes]).astype(np.float32)[:, : h * 32, : w * 32]
        coarse = onehot.reshape(len(classes), h, 32, w, 32).mean(axis=(2, 4))
        stored = np.concatenate([coarse, np.ones((1, h, w), np.float32)])  # class 3: not an image label
        write_scores(tmp_path / "scores" / f"{item.image_id}.npz", (*classes, 3), stored)
        coarse_label = np.asarray(classes, np.uint8)[resize_channels(coarse, *gt.shape).argmax(0)]
        write_label_map(tmp_path / "labels" / f"{item.image_id}.png", coarse_label)
        truth[item.image_id] = (gt, classes, _miou(coarse_label, gt, classes))
    return items, truth, tmp_path


@pytest.mark.parametrize("with_scores", [True, False])
def test_seed_plugin_expands_a_real_source(seed_source, with_scores: bool):
    items, truth, tmp_path = seed_source
    plugin = registry.get("svm")
    assert plugin.role is Role.REFINEMENT and plugin.title == "SVM (seed)"
    source = SourceVariant(lambda i: tmp_path / "labels" / f"{i}.png",
                           (lambda i: tmp_path / "scores" / f"{i}.npz") if with_scores else (lambda i: None))
    broken = Item("broken", tmp_path / "nowhere.jpg", None, items[0].labels, items[0].height, items[0].width)
    (tmp_path / "scores" / "broken.npz").write_bytes((tmp_path / "scores" / f"{items[0].image_id}.npz").read_bytes())
    write_label_map(tmp_path / "labels" / "broken.png", np.zeros((items[0].height, items[0].width), np.uint8))
    todo = [items[0], broken, *items[1:]]
    ctx = RunContext(classes=VOC, items=todo, todo=todo, workdir=tmp_path / "work", source=source, processes=1)
    results = list(plugin.run(plugin.make_config(TINY), ctx))
    assert [r.image_id for r in results] == [it.image_id for it in todo]
    assert results[1].label is None and str(tmp_path / "nowhere.jpg") in results[1].error
    for r in (results[0], *results[2:]):
        gt, classes, before = truth[r.image_id]
        assert r.error is None and r.label.shape == gt.shape
        assert set(np.unique(r.label)) <= set(classes)  # never the bogus class 3 of the source
        assert r.score_classes == classes
        after = _miou(r.label, gt, classes)
        assert after > before - 0.05, f"{r.image_id}: {before:.3f} -> {after:.3f}"
        assert after > 0.6, f"{r.image_id}: {after:.3f}"
