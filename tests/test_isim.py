"""engine/methods/isim.py: ISIM numerics by hand, then real training + both variants on real VOC images."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cache.classes import VOC
from engine.core import registry
from engine.core.registry import Role, training_key
from engine.core.types import Cancelled, RunContext
from engine.methods import isim
from engine.methods.isim import (
    ISIMConfig,
    foreground_images,
    modified_cross_entropy,
    restricted_softmax,
    training_round,
)
from engine.ops import augment
from engine.ops import cams as cam
from engine.ops.backbone import load_imagenet_model, pad_to_multiple
from engine.ops.checkpoints import checkpoint_path, final_path
from engine.ops.crf import DCRFConfig, refine_pseudo_label, scaled_dcrf
from tests.conftest import Reports, split_items

# 12 images, batch 4: 3 steps an epoch; 1 warm-up epoch + 2 rounds of 1 epoch = 9 steps on 64 crops.
TINY = ISIMConfig(epochs=3, warmup_epochs=1, regenerate_every=1, batch_size=4, crop_size=64,
                  resize_long=(64, 96), checkpoint_every=1, pseudo_scales=(0.5,), crf_max_side=64,
                  scales=(0.5,), flip=False, decoder_scales=(0.5,), score_max_side=32)


# ---------------------------------------------------------------- numerics worked out by hand

def test_modified_cross_entropy_drops_all_background_images_by_hand():
    # Two images of 1x2 pixels, 3 classes. Image 0 has a foreground pixel, so r_y = 1 (Eq. 3):
    #   pixel (0,0): logits [0, 0, 0], target 0 -> -log(1/3) = log 3
    #   pixel (0,1): logits [0, log 2, log 5] (softmax 1/8, 2/8, 5/8), target 2 -> log(8/5)
    # Image 1 is all background, so r_y = 0 and it adds nothing whatever its logits are.
    # Expected: mean over image 0's two pixels = (log 3 + log(8/5)) / 2 = log(24/5) / 2.
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 1, 0, 1], logits[0, 2, 0, 1] = math.log(2), math.log(5)
    logits[1] = torch.tensor([-7.0, 3.0, 11.0])[:, None, None]  # confidently wrong: would cost a lot
    logits.requires_grad_(True)
    target = torch.tensor([[[0, 2]], [[0, 0]]])
    loss = modified_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(math.log(24 / 5) / 2, rel=1e-6)
    loss.backward()
    assert not logits.grad[1].any()  # the dropped image gets no gradient
    assert logits.grad[0].abs().sum() > 0
    # Plain cross-entropy would also count image 1: log(1 + e^10 + e^18) - (-7) per pixel.
    plain = torch.nn.functional.cross_entropy(logits.detach(), target)
    assert plain.item() > 10 * loss.item()


def test_modified_cross_entropy_ignores_padding_and_empty_batches():
    logits = torch.zeros(2, 3, 1, 2, requires_grad=True)
    # Image 0: background + crop padding (255) only -> no foreground -> dropped (Eq. 3 counts 1-20).
    # Image 1: one foreground pixel and one ignored pixel -> only pixel (0,0) counts: log 3.
    target = torch.tensor([[[0, 255]], [[1, 255]]])
    assert foreground_images(target).tolist() == [False, True]
    assert modified_cross_entropy(logits, target).item() == pytest.approx(math.log(3))
    # Nothing kept: the loss is 0 and still backpropagates (zero gradient).
    empty = modified_cross_entropy(logits, torch.tensor([[[0, 0]], [[255, 0]]]))
    assert empty.item() == 0.0
    empty.backward()
    assert not logits.grad.any()
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        modified_cross_entropy(logits, torch.zeros(2, 1, 3, dtype=torch.long))


def test_training_rounds_follow_the_paper_schedule():
    # isim Sec. 4.1 / Fig. 5: 5 warm-up epochs, pseudo-labels regenerated after epochs 5, 15, 25, 35, 45.
    rounds = [training_round(e, warmup_epochs=5, regenerate_every=10) for e in range(50)]
    assert rounds[:5] == [0] * 5
    starts = [e for e in range(1, 50) if rounds[e] != rounds[e - 1]]
    assert starts == [5, 15, 25, 35, 45] and rounds[49] == 5
    # 3 epochs, 1 of warm-up: one round of 2 epochs (regenerate every 2) or two rounds of 1.
    assert [training_round(e, 1, 2) for e in range(3)] == [0, 1, 1]
    assert [training_round(e, 1, 1) for e in range(3)] == [0, 1, 2]


def test_restricted_softmax_by_hand():
    logits = torch.zeros(1, 21, 1, 1)
    logits[0, 0], logits[0, 8], logits[0, 12], logits[0, 3] = math.log(2), math.log(3), 0.0, 50.0
    # Kept: background, cat (8), dog (12) -> exp = 2, 3, 1 -> 2/6, 3/6, 1/6; class 3 (huge) is gone.
    probs = restricted_softmax(logits, (8, 12))
    assert probs.shape == (1, 3, 1, 1)
    assert probs.flatten().tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6])
    with pytest.raises(ValueError, match="1-20"):
        restricted_softmax(logits, (0,))


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    x = torch.ones(1, 1, 3, 5)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 4, 8)  # 3 -> 4 rows, 5 -> 8 columns
    assert padded.sum().item() == 15 and torch.equal(padded[..., :3, :5], x)
    assert pad_to_multiple(torch.ones(1, 1, 8, 4), 4).shape == (1, 1, 8, 4)  # already fits


def test_scaled_dcrf_shrinks_only_the_spatial_widths():
    cfg = scaled_dcrf(isim.ISIM_DCRF, 0.25)
    assert (cfg.gaussian_sxy, cfg.bilateral_sxy) == (0.75, 12.5)  # 3 * 0.25, 50 * 0.25
    assert (cfg.bilateral_srgb, cfg.gaussian_compat, cfg.bilateral_compat, cfg.gt_prob) == (5.0, 3.0, 10.0, 0.7)


def test_pseudo_label_threshold_then_dcrf_on_a_two_region_image():
    # Left half dark, right half bright; the cat CAM is 0.9 on the right half except one column
    # next to the edge (0.1, below the 0.3 threshold). dCRF's appearance kernel pulls that column
    # to its bright neighbours: the label becomes exactly the bright half.
    rgb = np.zeros((12, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = 220
    cams = np.zeros((1, 12, 16), dtype=np.float32)
    cams[0, :, 9:] = 0.9
    cams[0, :, 8] = 0.1
    assert not cam.cams_to_label(cams, (8,), 0.3)[:, 8].any()  # the seed misses the column
    label = refine_pseudo_label(rgb, cams, (8,), 0.3, DCRFConfig(bilateral_sxy=20, bilateral_srgb=10))
    expected = np.zeros((12, 16), dtype=np.uint8)
    expected[:, 8:] = 8
    assert label.dtype == np.uint8 and np.array_equal(label, expected)
    # An image without foreground classes gets an all-background pseudo-label.
    assert not refine_pseudo_label(rgb, np.zeros((0, 12, 16), np.float32), (), 0.3, isim.ISIM_DCRF).any()


def test_augment_with_label_moves_the_label_with_the_image():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(30, 40)).astype(np.uint8)
    rgb = np.repeat((label * 60 + 10)[..., None], 3, axis=2).astype(np.uint8)  # colour encodes the label
    for seed in range(6):
        # Long side stays 40 (no rescale): a 32 crop cuts, a 48 crop pads.
        for crop in (32, 48):
            image, crop_label = augment.augment_with_label(rgb, label, np.random.default_rng(seed), (40, 40), crop)
            alone = augment.augment(rgb, np.random.default_rng(seed), (40, 40), crop)
            assert np.array_equal(image, alone)  # same random draws as augment
            inside = crop_label != 255
            assert np.array_equal((image[..., 0][inside] - 10) // 60, crop_label[inside])
            assert inside.sum() == min(30, crop) * min(40, crop)
            assert np.all(image[~inside] == augment.PAD_VALUE)
    # A label stored at a lower resolution is resized to the image (nearest).
    _, small = augment.augment_with_label(rgb, label[::2, ::2], np.random.default_rng(1), (40, 40), 48)
    assert small.shape == (48, 48) and set(np.unique(small)) <= {0, 1, 2, 255}


def test_registered_variants_share_config_and_trained_model(tmp_path):
    cam_plugin, decoder_plugin = registry.get("isim-cam"), registry.get("isim-decoder")
    assert (cam_plugin.title, decoder_plugin.title) == ("ISIM CAM", "ISIM decoder")
    assert cam_plugin.role is decoder_plugin.role is Role.METHOD
    assert cam_plugin.config is decoder_plugin.config is ISIMConfig
    paper = cam_plugin.make_config(isim.PAPER_PARAMS)
    assert (paper.epochs, paper.warmup_epochs, paper.regenerate_every, paper.crop_size) == (50, 5, 10, 320)
    assert paper.pseudo_threshold == 0.3 and paper.scales == (1.0, 0.5, 1.5, 2.0) and paper.crf_max_side is None
    ctx = RunContext(classes=VOC, items=[], todo=[], workdir=tmp_path)
    # Inference settings share the model directory, training settings do not.
    inference = replace(TINY, scales=(1.0,), flip=True, decoder_scales=(1.0, 2.0), decoder_flip=True,
                        bg_threshold=0.5, score_max_side=16)
    key = training_key(TINY, classes=list(VOC.names))
    assert ctx.model_dir("isim", training_key(inference, classes=list(VOC.names))) == ctx.model_dir("isim", key)
    for change in ({"pseudo_threshold": 0.4}, {"crf_max_side": 80}, {"decoder_lr_mult": 0.1}):
        assert ctx.model_dir("isim", training_key(replace(TINY, **change), classes=list(VOC.names))) != \
            ctx.model_dir("isim", training_key(TINY, classes=list(VOC.names)))
    with pytest.raises(ValueError, match="warmup_epochs"):
        ISIMConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="multiple of output_stride"):
        ISIMConfig(crop_size=100)


def test_encoder_and_head_hold_the_imagenet_weights_and_cams_match_logits():
    net = isim.build_net(TINY, VOC.num_classes)
    imagenet = load_imagenet_model(TINY.backbone, TINY.output_stride).state_dict()
    encoder = net.seg.encoder.model.state_dict()
    head = {k.replace("0.", "conv_head.", 1).replace("1.", "bn2.", 1): v for k, v in net.head.state_dict().items()}
    assert encoder and head
    for key, value in [*encoder.items(), *head.items()]:  # every weight and BN statistic is ImageNet's
        assert torch.equal(value, imagenet[key]), key
    assert set(imagenet) - set(encoder) - set(head) == {"classifier.weight", "classifier.bias"}
    # The first 4 stages are frozen; the ImageNet parts' batch norm stays in eval mode in training.
    net.train()
    assert not any(p.requires_grad for s in net.encoder_stages[:4] for p in s.parameters())
    assert all(p.requires_grad for s in net.encoder_stages[4:] for p in s.parameters())
    for part in (net.seg.encoder, net.head):
        assert all(not m.training for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert any(m.training for m in net.seg.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits, seg = net(x)
        maps = net.class_maps(x)
    assert maps.shape == (2, 20, 4, 6) and seg.shape == (2, 21, 64, 96)
    assert torch.allclose(logits, maps.mean(dim=(2, 3)), atol=1e-5)  # GAP + 1x1 conv = mean of CAMs
    assert torch.allclose(net.classify(x), logits, atol=1e-5)


# ---------------------------------------------------------------- real training and inference

def test_both_variants_share_one_trained_model(tiny_voc, tmp_path):
    items = split_items(tiny_voc, "train")
    todo = [*split_items(tiny_voc, "val")[:2], items[0]]
    models = tmp_path / "models"
    first = Reports()
    ctx = RunContext(classes=VOC, items=items, todo=todo, workdir=tmp_path / "a", report=first, models=models, processes=2)
    cam_results = list(isim.run_cam(TINY, ctx))
    assert first.done("warm-up") == [1, 2, 3]
    assert first.done("pseudo-labels round 1") == first.done("pseudo-labels round 2") == list(range(1, 13))
    assert first.done("self-training") == [1, 2, 3, 4, 5, 6]
    model_dir = ctx.model_dir("isim", training_key(TINY, classes=list(VOC.names)))
    assert sorted(p.name for p in model_dir.iterdir()) == [f"{isim.FAMILY}_model.pt"]  # checkpoint + pseudo-labels gone

    # The decoder variant with other inference settings loads the same model: no training at all.
    second = Reports()
    decoder_cfg = replace(TINY, decoder_flip=True, bg_threshold=0.4)
    decoder_results = list(isim.run_decoder(decoder_cfg, RunContext(classes=VOC,
        items=items, todo=todo, workdir=tmp_path / "b", report=second, models=models, processes=2)))
    assert second.calls == []

    for results, name in ((cam_results, "cam"), (decoder_results, "decoder")):
        assert [r.image_id for r in results] == [i.image_id for i in todo]
        for item, result in zip(todo, results):
            assert result.error is None, name
            assert result.label.shape == (item.height, item.width) and result.label.dtype == np.uint8
            assert set(np.unique(result.label)) <= {0, *item.labels}, name  # only the image's classes
            assert result.score_classes == (0, *item.labels)
            k, h, w = result.scores.shape
            assert k == len(item.labels) + 1 and result.scores.dtype == np.float16
            assert max(h, w) == TINY.score_max_side
            assert 0 <= result.scores.min() and result.scores.max() <= 1.001
    for result in decoder_results:  # decoder scores: softmax over background + the image's classes
        np.testing.assert_allclose(result.scores.astype(np.float32).sum(axis=0), 1.0, atol=2e-2)
    for result in cam_results:  # CAM scores: the constant background channel of cam.py
        assert np.all(result.scores[0] == np.float16(TINY.bg_threshold))


def test_killed_regeneration_and_training_resume(tiny_voc, tmp_path, monkeypatch):
    monkeypatch.setattr(isim, "PSEUDO_CHUNK", 4)  # 3 pseudo-label files of 4 images per round
    items = split_items(tiny_voc, "train")
    workdir = tmp_path / "work"
    model_dir = RunContext(classes=VOC, items=items, todo=[], workdir=workdir).model_dir("isim", training_key(TINY, classes=list(VOC.names)))

    def run(reports: Reports) -> list:
        ctx = RunContext(classes=VOC, items=items, todo=items[:1], workdir=workdir, report=reports, processes=1)
        return list(isim.run_cam(TINY, ctx))

    # Killed during the first regeneration, after image 6: the file of images 1-4 is kept.
    first = Reports(cancel_at=("pseudo-labels round 1", 6))
    with pytest.raises(Cancelled):
        run(first)
    assert first.done("warm-up") == [1, 2, 3]
    assert sorted(p.name for p in model_dir.glob("pseudo_*")) == ["pseudo_r1_0000.npz"]
    assert torch.load(checkpoint_path(model_dir, isim.FAMILY), weights_only=True)["step"] == 3

    # Rerun: no warm-up again, images 1-4 read back (one jump to 4), 5-12 computed; killed in training.
    second = Reports(cancel_at=("self-training", 2))
    with pytest.raises(Cancelled):
        run(second)
    assert second.done("warm-up") == []
    assert second.done("pseudo-labels round 1") == [4, *range(5, 13)]
    assert second.done("self-training") == [1, 2]
    assert len(list(model_dir.glob("pseudo_r1_*.npz"))) == 3

    # Rerun: round 1's pseudo-labels are all read back, training continues after step 2.
    third = Reports()
    results = run(third)
    assert third.done("pseudo-labels round 1") == [4, 8, 12]
    assert third.done("self-training") == [3, 4, 5, 6]
    assert third.done("pseudo-labels round 2") == list(range(1, 13))
    assert final_path(model_dir, isim.FAMILY).is_file() and not (checkpoint_path(model_dir, isim.FAMILY)).exists()
    assert not list(model_dir.glob("pseudo_*"))
    assert set(np.unique(results[0].label)) <= {0, *items[0].labels}

    # Trained: a rerun only loads the model.
    fourth = Reports()
    again = run(fourth)
    assert fourth.calls == [] and np.array_equal(again[0].label, results[0].label)
