"""engine/methods/tkp_pcl.py: TKP-PCL numerics by hand, then real encoders, training and labelling."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cache.classes import VOC
from engine.core import registry
from engine.core.registry import Role
from engine.core.types import Cancelled, Item, RunContext
from engine.methods import tkp_pcl
from engine.methods.tkp_pcl import (
    TKPPCLConfig,
    classification_error,
    encoder_input,
    image_target,
    load_vit,
    patch_contrastive_error,
    restrict_to_image_classes,
    top_k_pooling,
    upsample_scores,
)
from engine.ops.checkpoints import checkpoint_path, final_path
from engine.ops.scores import argmax_label
from tests.conftest import Reports, split_items

# 128 px squares -> 8 x 8 patches; 12 images at batch 4 -> 3 steps an epoch.
TINY = TKPPCLConfig(input_size=128, epochs=1, batch_size=4, checkpoint_every=2, score_max_side=64)


# ---------------------------------------------------------------- numerics worked out by hand

def test_top_k_pooling_averages_the_k_best_patches():
    # One image, 4 patches, 2 classes: class 0 scores 0.1 0.9 0.5 0.3, class 1 0.2 0.2 0.8 0.4.
    scores = torch.tensor([[[0.1, 0.2], [0.9, 0.2], [0.5, 0.8], [0.3, 0.4]]])
    # k = 2: (0.9 + 0.5) / 2 = 0.7 and (0.8 + 0.4) / 2 = 0.6.
    assert torch.allclose(top_k_pooling(scores, 2), torch.tensor([[0.7, 0.6]]))
    # k = 1 is global max pooling (ViT-PCM); k >= s averages all patches: 1.8 / 4, 1.6 / 4.
    assert torch.allclose(top_k_pooling(scores, 1), torch.tensor([[0.9, 0.8]]))
    assert torch.allclose(top_k_pooling(scores, 6), torch.tensor([[0.45, 0.4]]))
    with pytest.raises(ValueError, match=r"\(B, s, C\)"):
        top_k_pooling(scores[0], 2)


def test_classification_error_is_the_mean_bce_of_eq2():
    y = torch.tensor([[0.8, 0.25], [0.5, 0.5]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Image 1: -(log 0.8 + log 0.75) / 2; image 2: -(log 0.5 + log 0.5) / 2; mean of the two.
    image1 = -(math.log(0.8) + math.log(0.75)) / 2  # 0.25541
    image2 = math.log(2)  # 0.69315
    assert classification_error(y, t).item() == pytest.approx((image1 + image2) / 2, rel=1e-5)
    assert classification_error(y[:1], t[:1]).item() == pytest.approx(image1, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        classification_error(y, t[:, :1])


def test_patch_contrastive_error_by_hand():
    # Four patch embeddings: a = (1, 0), b = (2, 2) (length must not matter), c = (0, 1), d = (-1, 0).
    # cos: ab = 1/sqrt2, ac = 0, ad = -1, bc = 1/sqrt2, bd = -1/sqrt2; S_bar = (1 + cos) / 2 (eq. 4):
    # ab 0.85355, ac 0.5, ad 0, bc 0.85355, bd 0.14645.
    features = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [0.0, 1.0], [-1.0, 0.0]]], requires_grad=True)
    # Class 0: high = {a, b} (> 0.85), low = {c, d} (< 0.15).
    # Class 1: high = {b}, low = {a}; 0.85 is not above epsilon, 0.5 neither high nor low.
    # Class 2: no high patch.
    scores = torch.tensor([[[0.90, 0.10, 0.5], [0.95, 0.90, 0.5], [0.10, 0.85, 0.5], [0.05, 0.50, 0.5]]])
    sbar_ab = (1 + 1 / math.sqrt(2)) / 2
    # Class 0: positives (a, b), (b, a): mean 1 - 0.85355 = 0.14645; negatives ac, ad, bc, bd:
    # (0.5 + 0 + 0.85355 + 0.14645) / 4 = 0.375.
    class0 = (1 - sbar_ab) + (0.5 + 0.0 + sbar_ab + (1 - sbar_ab)) / 4
    # Class 1: one high patch -> no positive pair (term 0); negative (b, a): 0.85355.
    class1 = sbar_ab
    pce = patch_contrastive_error(features, scores, epsilon=0.85)
    assert pce.shape == (1, 3)
    assert torch.allclose(pce, torch.tensor([[class0, class1, 0.0]]), atol=1e-6)
    # The error moves the embeddings (F_out); the thresholded scores only select patches.
    pce.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, s, e\)"):
        patch_contrastive_error(features[0], scores, 0.85)


def test_image_target_has_background_always_on():
    target = image_target((8, 15), VOC.num_classes)
    assert target.shape == (21,) and target.dtype == np.float32
    assert np.flatnonzero(target).tolist() == [0, 8, 15]
    assert np.flatnonzero(image_target((), VOC.num_classes)).tolist() == [0]


def test_pseudo_label_keeps_only_the_image_classes_by_hand():
    # A 1 x 2 patch grid. Patch A: background 0.1, cat (8) 0.3, dog (12) 0.6; patch B: 0.5, 0.1, 0.4.
    z = np.zeros((21, 1, 2), dtype=np.float32)
    z[0, 0] = [0.1, 0.5]
    z[8, 0] = [0.3, 0.1]
    z[12, 0] = [0.6, 0.4]
    # The image is labelled cat only: dog is dropped, the rest renormalised per patch:
    # A -> (0.25, 0.75), B -> (0.5 / 0.6, 0.1 / 0.6) = (0.8333, 0.1667).
    kept = restrict_to_image_classes(z, (8,))
    np.testing.assert_allclose(kept[:, 0], [[0.25, 5 / 6], [0.75, 1 / 6]], rtol=1e-6)
    # Bilinear to a 1 x 4 image (half-pixel centres at grid x = 0, 0.25, 0.75, 1 after clamping):
    # cat 0.75, 0.75*0.75 + 0.25/6 = 0.6042, 0.25*0.75 + 0.75/6 = 0.3125, 1/6.
    up = upsample_scores(kept, (1, 4))
    np.testing.assert_allclose(up[1, 0], [0.75, 0.75 * 0.75 + 0.25 / 6, 0.25 * 0.75 + 0.75 / 6, 1 / 6], rtol=1e-5)
    label = argmax_label(up, (0, 8))
    assert label.dtype == np.uint8 and label.tolist() == [[8, 8, 0, 0]]  # never dog, though dog led A
    # Labelled dog instead: A -> (1/7, 6/7), B -> (5/9, 4/9); dog upsampled 0.857, 0.754, 0.548,
    # 0.444 against background 0.143, 0.246, 0.452, 0.556.
    dog = upsample_scores(restrict_to_image_classes(z, (12,)), (1, 4))
    assert argmax_label(dog, (0, 12)).tolist() == [[12, 12, 12, 0]]
    with pytest.raises(ValueError, match="1-20"):
        restrict_to_image_classes(z, (0,))
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        argmax_label(up[:1], (0, 8))


def test_registered_with_config_and_paper_preset():
    plugin = registry.get("tkp-pcl")
    assert plugin.role is Role.METHOD and plugin.config is TKPPCLConfig and plugin.title == "TKP-PCL"
    default = TKPPCLConfig()
    assert (default.top_k, default.epsilon, default.alpha, default.batch_size) == (6, 0.85, 0.01, 16)
    assert (default.lr, default.lr_after) == (1e-3, 1e-4)
    paper = plugin.make_config(tkp_pcl.PAPER_PARAMS)
    assert (paper.input_size, paper.epochs, paper.lr_drop_epoch) == (384, 50, 2)
    assert paper.vit_name == "vit_base_patch16_384"
    with pytest.raises(ValueError, match="epsilon"):
        TKPPCLConfig(epsilon=0.4)  # high and low sets would overlap
    with pytest.raises(ValueError, match="unknown parameter"):
        plugin.make_config({"k": 6})
    # Inference settings and the unused encoder field do not change the trained model.
    params = tkp_pcl.training_params(default, VOC)
    assert "score_max_side" not in params and "vit_name" not in params and params["backbone"] == "efficientnet_lite0"
    assert tkp_pcl.training_params(replace(default, vit_name="vit_small_patch16_224"), VOC) == params
    assert "backbone" not in tkp_pcl.training_params(replace(default, vit_weights="/w.pth"), VOC)


# ---------------------------------------------------------------- real encoders, training, labels

def _check_results(todo: list[Item], results: list, cfg: TKPPCLConfig) -> None:
    assert [r.image_id for r in results] == [i.image_id for i in todo]
    for item, result in zip(todo, results):
        if item.image_id == "broken":
            assert result.label is None and "broken.jpg" in result.error
            continue
        assert result.error is None
        assert result.label.shape == (item.height, item.width) and result.label.dtype == np.uint8
        assert set(np.unique(result.label)) <= {0, *item.labels}
        assert result.score_classes == (0, *item.labels)
        k, h, w = result.scores.shape
        assert k == len(item.labels) + 1 and result.scores.dtype == np.float16
        assert max(h, w) == cfg.score_max_side and abs(h / w - item.height / item.width) < 0.05
        # Restricted softmax: a distribution over background + the image's classes everywhere.
        assert 0 <= result.scores.min() and result.scores.max() <= 1
        np.testing.assert_allclose(result.scores.astype(np.float32).sum(axis=0), 1, atol=5e-3)


def test_run_end_to_end_with_the_efficientnet_default(tiny_voc, tmp_path):
    train_items = split_items(tiny_voc, "train")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    todo = [*split_items(tiny_voc, "val"), Item("broken", broken, None, (8,), 10, 10), *train_items[:3]]
    reports = Reports()
    ctx = RunContext(classes=VOC, items=train_items, todo=todo, workdir=tmp_path / "work", report=reports)
    results = list(tkp_pcl.run(TINY, ctx))

    assert reports.stage("features") == [(8, 12), (12, 12)]  # ENCODE_BATCH images at a time
    assert reports.stage("train") == [(1, 3), (2, 3), (3, 3)]
    _check_results(todo, results, TINY)
    model_dir = ctx.model_dir("tkp-pcl", tkp_pcl.training_params(TINY, VOC))
    assert (model_dir / final_path(Path(), tkp_pcl.NAME).name).is_file() and not (model_dir / checkpoint_path(Path(), tkp_pcl.NAME).name).exists()
    features = np.load(ctx.model_dir("tkp-pcl-features", tkp_pcl.feature_params(TINY)) / tkp_pcl.FEATURES_NAME)
    assert features.shape == (12, 2, 8, 8, 320) and features.dtype == np.float16  # 128 / 16 = 8 patches a side

    # An image outside the store is encoded at labelling time; it matches the stored embeddings of
    # the same image up to float16 rounding (batch sizes differ), and so do the labels.
    again = list(tkp_pcl.run(TINY, RunContext(classes=VOC, items=train_items, todo=[replace(train_items[0], image_id="copy")],
                                              workdir=tmp_path / "work")))
    np.testing.assert_allclose(again[0].scores.astype(np.float32), results[-3].scores.astype(np.float32), atol=1e-2)
    assert (again[0].label == results[-3].label).mean() > 0.99


def test_run_end_to_end_with_a_vit_weights_file(tiny_voc, tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # random weights, with head
    weights = tmp_path / "vit_tiny.pth"
    torch.save(vit.state_dict(), weights)
    cfg = replace(TINY, vit_weights=str(weights), vit_name="vit_tiny_patch16_224", input_size=96)

    # The loader fills every parameter from the file (head dropped) ...
    loaded = load_vit(cfg.vit_name, weights).state_dict()
    source = vit.state_dict()
    assert set(loaded) == {k for k in source if not k.startswith("head.")}
    assert all(torch.equal(loaded[k], source[k]) for k in loaded)
    # ... from safetensors as well, and refuses files of another architecture, naming them.
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "vit_tiny.safetensors"))
    from_safetensors = load_vit(cfg.vit_name, tmp_path / "vit_tiny.safetensors").state_dict()
    assert torch.equal(from_safetensors["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="vit_tiny.pth"):
        load_vit("vit_small_patch16_224", weights)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vit(cfg.vit_name, tmp_path / "missing.pth")

    train_items = split_items(tiny_voc, "train")
    todo = [*split_items(tiny_voc, "val")[:2], train_items[0]]
    ctx = RunContext(classes=VOC, items=train_items, todo=todo, workdir=tmp_path / "work")
    results = list(tkp_pcl.run(cfg, ctx))
    _check_results(todo, results, cfg)

    # The stored patch embeddings are the saved ViT's patch tokens (class token dropped) of the
    # 96 x 96 resized image: 6 x 6 patches of 192 channels; view 1 is the mirrored image.
    features = np.load(ctx.model_dir("tkp-pcl-features", tkp_pcl.feature_params(cfg)) / tkp_pcl.FEATURES_NAME)
    assert features.shape == (12, 2, 6, 6, 192)
    rgb = np.asarray(Image.open(train_items[0].image_path).convert("RGB"))
    x = encoder_input(rgb, 96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[None]
    vit_dynamic = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    vit_dynamic.load_state_dict({k: v for k, v in source.items() if not k.startswith("head.")})
    with torch.no_grad():
        tokens = vit_dynamic.eval().forward_features(torch.cat([x, x.flip(-1)]))[:, 1:].reshape(2, 6, 6, 192)
    np.testing.assert_allclose(features[0].astype(np.float32), tokens.numpy(), atol=2e-2, rtol=1e-2)


def test_killed_feature_extraction_and_training_resume(tiny_voc, tmp_path):
    items = split_items(tiny_voc, "train")
    cfg = replace(TINY, epochs=2)  # 6 steps, checkpoints after steps 2, 3, 4, 6
    workdir = tmp_path / "work"
    probe = RunContext(classes=VOC, items=items, todo=[], workdir=workdir)
    model_dir = probe.model_dir("tkp-pcl", tkp_pcl.training_params(cfg, VOC))
    feature_dir = probe.model_dir("tkp-pcl-features", tkp_pcl.feature_params(cfg))

    first = Reports(cancel_at=("features", 8))
    with pytest.raises(Cancelled):
        list(tkp_pcl.run(cfg, RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=first)))
    assert json.loads((feature_dir / tkp_pcl.FEATURES_INDEX).read_text())["done"] == 8

    second = Reports(cancel_at=("train", 5))
    with pytest.raises(Cancelled):
        list(tkp_pcl.run(cfg, RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=second)))
    assert second.stage("features") == [(12, 12)]  # the first 8 images were not encoded again
    assert second.stage("train") == [(d, 6) for d in range(1, 6)]
    assert (model_dir / checkpoint_path(Path(), tkp_pcl.NAME).name).is_file() and not (model_dir / final_path(Path(), tkp_pcl.NAME).name).exists()

    third = Reports()
    resumed = list(tkp_pcl.run(cfg, RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=third)))
    assert third.stage("features") == [] and third.stage("train") == [(5, 6), (6, 6)]  # after the step-4 checkpoint
    assert (model_dir / final_path(Path(), tkp_pcl.NAME).name).is_file() and not (model_dir / checkpoint_path(Path(), tkp_pcl.NAME).name).exists()

    # Same batches, views, dropout masks and optimiser state: equal to an uninterrupted run.
    straight = tmp_path / "straight"
    list(tkp_pcl.run(cfg, RunContext(classes=VOC, items=items, todo=[], workdir=straight)))
    straight_dir = RunContext(classes=VOC, items=items, todo=[], workdir=straight).model_dir("tkp-pcl", tkp_pcl.training_params(cfg, VOC))
    a = torch.load(model_dir / final_path(Path(), tkp_pcl.NAME).name, weights_only=True)["model"]
    b = torch.load(straight_dir / final_path(Path(), tkp_pcl.NAME).name, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # Once trained, a rerun (other inference settings) only loads: no features, no steps, same labels.
    fourth = Reports()
    again = list(tkp_pcl.run(replace(cfg, score_max_side=32),
                             RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=fourth)))
    assert fourth.calls == []
    assert all(np.array_equal(x.label, y.label) for x, y in zip(resumed, again))
