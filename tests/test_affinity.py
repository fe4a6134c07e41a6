"""AffinityNet + random walk: hand-worked numerics, affinity labels on a hand-built CAM, the plugin
on real images, and a worker killed during training and during the walk."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
from PIL import Image

from cache.classes import VOC
from cache import queries
from cache.db import connect
from cache.labelmaps import write_label_map, write_scores
from engine.core import registry
from engine.core.chains import Step, dataset_id_for
from engine.core.registry import training_key
from engine.core.types import Cancelled, RunContext, SourceVariant
from engine.ops.checkpoints import checkpoint_path, final_path
from engine.refine import random_walk as affinity
from engine.refine.random_walk import (
    _label_job,
    _LabelJob,
    affinity_label,
    affinity_loss,
    affinity_matrix,
    grid_label,
    pair_offsets,
    random_walk,
    scores_on_grid,
    transition_matrix,
    walk_to_label,
)
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import TINY_CAM, Reports, job_row, kill_when, split_items, worker_process

# A training small enough for tests: 2 epochs at batch 2 on 128-pixel crops.
TINY_RW = {"epochs": 2, "batch_size": 2, "crop_size": 128, "resize_long": [128, 192], "checkpoint_every": 1}


def test_pair_offsets_are_psa_half_disk():
    assert pair_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    offsets = pair_offsets(5)
    assert len(offsets) == 34 and len(set(offsets)) == 34
    assert all(0 < dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert not any((-dy, -dx) in offsets for dy, dx in offsets)  # one of each opposite pair


def test_affinity_label_combines_the_two_thresholds_by_hand():
    fg = np.array([[8, 8, 0, 0]], np.uint8)  # confident cat at the high threshold
    bg = np.array([[8, 8, 8, 0]], np.uint8)  # the low threshold finds the cat one pixel wider
    assert affinity_label(fg, bg).tolist() == [[8, 8, 255, 0]]
    with pytest.raises(ValueError, match="different shapes"):
        affinity_label(fg, bg[:, :3])


def test_affinity_labels_of_a_hand_built_cam_on_a_three_region_image(tmp_path):
    # A cat block (CAM 0.9) inside a band (CAM 0.2, between the thresholds 0.05 and 0.30), on a
    # background (CAM 0). Each region has its own colour, so dCRF keeps the thresholded maps:
    # cat in the block, ignore in the band, background elsewhere.
    rgb = np.full((40, 48, 3), 30, np.uint8)
    rgb[8:32, 8:40] = (200, 200, 60)
    rgb[14:26, 16:32] = (40, 90, 220)
    cams = np.zeros((1, 40, 48), np.float32)
    cams[0, 8:32, 8:40] = 0.2
    cams[0, 14:26, 16:32] = 0.9
    Image.fromarray(rgb).save(tmp_path / "a.png")
    cfg = affinity.RandomWalkConfig(label_side=48)
    result = _label_job(_LabelJob("a", tmp_path / "a.png", (8,), cams, None), cfg)
    expected = np.zeros((40, 48), np.uint8)
    expected[8:32, 8:40] = 255
    expected[14:26, 16:32] = 8
    assert result.error is None and np.array_equal(result.label, expected)
    # At label_side 24 the labels come at half size, same regions.
    half = _label_job(_LabelJob("a", tmp_path / "a.png", (8,), cams, None), affinity.RandomWalkConfig(label_side=24))
    assert half.label.shape == (20, 24) and (half.label == 8).sum() == pytest.approx(6 * 8, abs=6)
    # A label-only source is its own affinity label, resized (nearest) to the label size.
    own = _label_job(_LabelJob("a", tmp_path / "a.png", (0, 8), None, expected), affinity.RandomWalkConfig(label_side=24))
    assert np.array_equal(own.label, expected[::2, ::2])
    missing = _label_job(_LabelJob("b", tmp_path / "b.png", (8,), cams, None), cfg)
    assert missing.label is None and "b.png" in missing.error


def test_affinity_loss_by_hand():
    # Two pixels side by side, features 0 and ln 2: a = exp(-ln 2) = 0.5.
    features = torch.tensor([[[[0.0, math.log(2.0)]]]])
    loss = lambda labels: float(affinity_loss(features, torch.tensor([[labels]]), [(0, 1)]))  # noqa: E731
    positive = -math.log(0.5 + 1e-5) / (1 + 1e-5)
    assert loss([8, 8]) == pytest.approx(positive / 4)  # same foreground class: L_fg+ / 4
    assert loss([0, 0]) == pytest.approx(positive / 4)  # both background: L_bg+ / 4
    assert loss([0, 8]) == pytest.approx(-math.log(0.5 + 1e-5) / (1 + 1e-5) / 2)  # different: L- / 2
    assert loss([255, 8]) == 0.0  # an ignored pixel makes no pair
    with pytest.raises(ValueError, match="expected features"):
        affinity_loss(features, torch.zeros(1, 2, 2, dtype=torch.long), [(0, 1)])


def test_affinity_matrix_by_hand():
    # One row of three pixels with features 0, ln 2, ln 4: a01 = a12 = 0.5, a02 = 0.25.
    features = np.log(np.array([[[1.0, 2.0, 4.0]]], np.float32))
    dense = affinity_matrix(features, radius=3).toarray()
    np.testing.assert_allclose(dense, [[1, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 1]], rtol=1e-6)
    # Radius 2 only links direct neighbours.
    np.testing.assert_allclose(affinity_matrix(features, radius=2).toarray()[0], [1, 0.5, 0], rtol=1e-6)


def test_random_walk_transition_on_a_hand_built_affinity_matrix():
    # Two components: pixels {0, 1} with affinity 0.5, pixels {2, 3} with affinity 1.
    a = scipy.sparse.csr_matrix(np.array([[1, 0.5, 0, 0], [0.5, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]))
    t = transition_matrix(a, beta=1.0).toarray()
    np.testing.assert_allclose(t[:, 0], [2 / 3, 1 / 3, 0, 0])  # column 0 of A over its sum 1.5
    np.testing.assert_allclose(t[:, 2], [0, 0, 0.5, 0.5])
    t2 = transition_matrix(a, beta=2.0).toarray()
    np.testing.assert_allclose(t2[:, 0], [0.8, 0.2, 0, 0])  # 0.5^2 = 0.25 against 1: 1 / 1.25
    scores = np.array([[[1.0, 0.0, 0.4, 0.0]]])  # one class on a 1x4 grid
    # exp_times 1: two steps. v T = [2/3, 1/3, .2, .2]; again: [5/9, 4/9, .2, .2].
    np.testing.assert_allclose(random_walk(scores, scipy.sparse.csr_matrix(t), 1)[0, 0], [5 / 9, 4 / 9, 0.2, 0.2], rtol=1e-6)
    # It is v T^(2^t), and a long walk reaches each component's mean.
    np.testing.assert_allclose(random_walk(scores, scipy.sparse.csr_matrix(t), 3)[0, 0],
                               scores[0, 0] @ np.linalg.matrix_power(t, 8), rtol=1e-5)
    np.testing.assert_allclose(random_walk(scores, scipy.sparse.csr_matrix(t), 8)[0, 0], [0.5, 0.5, 0.2, 0.2], atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        random_walk(np.zeros((1, 2, 3)), scipy.sparse.csr_matrix(t), 1)


def test_walk_to_label_is_irns_read_out_by_hand():
    walked = np.array([[[0.2, 0.8], [0.1, 0.05]]], np.float32)
    label, scores = walk_to_label(walked, (8,), bg_threshold=0.25)
    # Divided by the maximum 0.8: 0.25 (ties go to background), 1, 0.125, 0.0625.
    assert label.tolist() == [[0, 8], [0, 0]]
    np.testing.assert_allclose(scores, [[[0.25, 0.25], [0.25, 0.25]], [[0.25, 1.0], [0.125, 0.0625]]])
    assert not walk_to_label(np.zeros((1, 2, 2), np.float32), (8,), 0.25)[0].any()
    # Two classes: globally the dog scores 0.4 / 0.8 = 0.5 < 0.6 and loses; over its own max it is 1.
    two = np.array([[[0.8, 0.0, 0.1]], [[0.0, 0.4, 0.1]]], np.float32)
    assert walk_to_label(two, (8, 12), 0.6)[0].tolist() == [[8, 0, 0]]
    assert walk_to_label(two, (8, 12), 0.6, "per_class")[0].tolist() == [[8, 12, 0]]
    with pytest.raises(ValueError, match="normalise"):
        walk_to_label(two, (8, 12), 0.6, "max")


def test_scores_on_grid_and_grid_label_by_hand():
    scores = np.zeros((1, 12, 12), np.float32)
    scores[0, :8, :8] = 1.0
    # A 12x12 image on a 2x2 grid of 8-pixel cells (covering 16x16, zero-padded).
    np.testing.assert_allclose(scores_on_grid(scores, (12, 12), (2, 2))[0], [[1.0, 0.0], [0.0, 0.0]])
    scores[0, 8:, 8:] = 1.0
    np.testing.assert_allclose(scores_on_grid(scores, (12, 12), (2, 2))[0], [[1.0, 0.0], [0.0, 16 / 64]])
    with pytest.raises(ValueError, match="does not cover"):
        scores_on_grid(scores, (20, 12), (2, 2))
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert grid_label(label).tolist() == [[4 * 16 + 4, 4 * 16 + 12], [12 * 16 + 4, 12 * 16 + 12]]


def test_affinitynet_features_are_at_stride_8():
    net = affinity.build_net(affinity.RandomWalkConfig()).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 100, 132))
    assert out.shape == (1, 448, 13, 17) and (out >= -1).all()  # ELU output


@pytest.fixture
def cam_source(tiny_voc: Path, tmp_path: Path):
    """A stored CAM-like source for the 12 real train images: the ground truth's foreground,
    box-blurred and shrunk to 64 pixels (scores), so the walk has real images and plausible seeds."""
    items = split_items(tiny_voc, "train")
    folder = tmp_path / "source"
    for item in items:
        mask = np.asarray(Image.open(item.mask_path))
        maps = []
        for c in item.labels:
            m = Image.fromarray(((mask == c) * 255).astype(np.uint8)).resize((64, 48), Image.BOX)
            maps.append(np.asarray(m, np.float32) / 255 * 0.8)
        scores = np.stack([np.full((48, 64), 0.3, np.float32), *maps])
        write_scores(folder / f"{item.image_id}.npz", (0, *item.labels), scores)
        write_label_map(folder / f"{item.image_id}.png", np.where(mask == 255, 0, mask).astype(np.uint8))
    source = SourceVariant(lambda i: folder / f"{i}.png", lambda i: folder / f"{i}.npz", "src")
    return items, source


def test_plugin_refines_real_images_and_resumes_a_killed_training(cam_source, tmp_path):
    items, source = cam_source
    cfg = registry.get("random-walk").make_config(TINY_RW)
    workdir = tmp_path / "work"

    def ctx(reports: Reports, todo=items[:3]) -> RunContext:
        return RunContext(classes=VOC, items=items, todo=todo, workdir=workdir, report=reports, source=source, processes=1)

    model_dir = ctx(Reports()).model_dir(affinity.FAMILY, training_key(cfg, source="src"))
    first = Reports(cancel_at=("train", 3))
    with pytest.raises(Cancelled):
        list(affinity.run(cfg, ctx(first)))
    assert first.done("affinity labels") == list(range(1, 13))
    assert torch.load(checkpoint_path(model_dir, affinity.FAMILY), weights_only=True)["step"] == 3
    second = Reports()
    results = list(affinity.run(cfg, ctx(second)))
    assert second.done("affinity labels") == [12]  # read back, not recomputed
    assert second.done("train") == list(range(4, 13))  # continued after step 3 (12 images, batch 2, 2 epochs)
    assert final_path(model_dir, affinity.FAMILY).is_file() and not list(model_dir.glob("affinity_labels_*"))

    # The same training uninterrupted gives the same model.
    straight = RunContext(classes=VOC, items=items, todo=[], workdir=tmp_path / "straight", source=source, processes=2)
    affinity.train(cfg, straight)
    a = torch.load(final_path(model_dir, affinity.FAMILY), weights_only=True)["model"]
    b = torch.load(final_path(straight.model_dir(affinity.FAMILY, training_key(cfg, source="src")),
                              affinity.FAMILY), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    for item, result in zip(items, results):
        assert result.error is None
        assert result.label.shape == (item.height, item.width) and result.label.dtype == np.uint8
        assert set(np.unique(result.label)) <= {0, *item.labels}
        assert result.score_classes == (0, *item.labels)
        assert result.scores.shape[0] == len(item.labels) + 1 and max(result.scores.shape[1:]) == cfg.score_max_side
        assert np.all(result.scores[0] == np.float16(cfg.sem_seg_bg_thres))
        gt = np.asarray(Image.open(item.mask_path))
        known = gt != 255
        assert (result.label[known] == gt[known]).mean() > 0.6  # seeds from the ground truth: mostly right


def test_plugin_walks_a_label_only_source_and_reports_bad_files(cam_source, tmp_path):
    items, _ = cam_source
    labels_only = SourceVariant(lambda i: tmp_path / "source" / f"{i}.png", lambda i: None, "labels")
    (tmp_path / "source" / f"{items[1].image_id}.png").write_bytes(b"not a png")
    cfg = registry.get("random-walk").make_config({**TINY_RW, "epochs": 1})
    ctx = RunContext(classes=VOC, items=items, todo=items[:2], workdir=tmp_path / "w", source=labels_only, processes=2)
    first, second = affinity.run(cfg, ctx)
    assert first.error is None and first.score_classes == (0, *items[0].labels)
    total = first.scores.astype(np.float32).sum(axis=0)  # a walked one-hot map: at most 1 per pixel,
    assert total.max() <= 1.01 and np.median(total) > 0.98  # less only in cells the grid pads
    assert second.label is None and items[1].image_id in second.error and "unreadable" in second.error


def test_chain_survives_a_worker_killed_in_training_and_in_the_walk(baseline_cache, tmp_path):
    cache_dir, root = baseline_cache
    slow = {**TINY_RW, "epochs": 4}  # 16 steps: time to see the training stage
    chain = [Step("cam", TINY_CAM), Step("random-walk", slow), Step("dcrf")]
    reference = tmp_path / "reference"
    shutil.copytree(cache_dir, reference)
    assert len(submit_chain(reference, root, "train", chain)) == 2  # CAM is complete already
    serve(WorkerConfig(reference, until_idle=True, poll_seconds=0.1))

    killed = tmp_path / "killed"
    shutil.copytree(cache_dir, killed)
    walk_job, crf_job = submit_chain(killed, root, "train", chain)
    state = kill_when(worker_process(killed), killed, walk_job, "train", 2)
    assert state.status == "running" and state.done < 16
    state = kill_when(worker_process(killed), killed, walk_job, "label", 2)  # resumed training, then walking
    assert state.status == "running" and state.done < 8 and state.attempts == 2
    assert submit_chain(killed, root, "train", chain) == [walk_job, crf_job]  # re-queuing adds nothing
    restarted = worker_process(killed, "--until-idle")
    assert restarted.wait(timeout=300) == 0, restarted.stderr.read()
    assert job_row(killed, walk_job).status == job_row(killed, crf_job).status == "done"
    assert submit_chain(killed, root, "train", chain) == []  # complete: nothing to queue

    with connect(killed, read_only=True) as con, connect(reference, read_only=True) as ref:
        for job_id in (walk_job, crf_job):
            variant = queries.get_job(con, job_id).variant_id
            ours, theirs = queries.label_map_rows(con, variant), queries.label_map_rows(ref, variant)
            assert len(ours) == 8 and ours.keys() == theirs.keys()
            for image_id in ours:
                assert (killed / ours[image_id][0]).read_bytes() == (reference / theirs[image_id][0]).read_bytes()
        names = [v.name for v in queries.variants(con, dataset_id_for(root))]
    assert any(name.endswith("→ random walk (batch_size=2, checkpoint_every=1, crop_size=128, epochs=4, "
                              "resize_long=[128, 192]) → dCRF") for name in names)
