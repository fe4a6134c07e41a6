"""engine/methods/cam.py: CAM numerics by hand, then real training + inference on real VOC images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.classes import VOC
from engine.core import registry
from engine.core.registry import Role, training_key
from engine.core.types import Cancelled, Item, RunContext
from engine.methods import cam
from engine.methods.cam import CAMConfig
from engine.ops import augment
from engine.ops.cams import cams_to_label, multilabel_target, normalise_cams, select_classes
from engine.ops.checkpoints import checkpoint_path, final_path, load_checked
from engine.ops.scores import downsample_scores
from engine.ops.scores import strided_to_image as cam_to_image_size
from engine.ops.training import poly_lr
from tests.conftest import Reports, split_items

# A few optimisation steps on small crops; one scale with flip at inference.
TINY = CAMConfig(epochs=1, batch_size=4, crop_size=128, resize_long=(128, 192), scales=(1.0,),
                 checkpoint_every=2, score_max_side=64)


# ---------------------------------------------------------------- numerics worked out by hand

def test_two_class_cams_thresholded_by_hand():
    cat = [[0.9, 0.2, 0.0], [0.5, 0.1, 0.3]]
    dog = [[0.1, 0.6, 0.25], [0.5, 0.05, 0.2]]
    cams = np.array([cat, dog], dtype=np.float32)
    # 0.25: (0,2) ties background with dog -> background; (1,0) ties cat with dog -> cat (first).
    expected = np.array([[8, 12, 0], [8, 0, 8]], dtype=np.uint8)
    label = cams_to_label(cams, (8, 12), 0.25)
    assert label.dtype == np.uint8 and np.array_equal(label, expected)
    # isim's 0.3: the cat pixel at exactly 0.3 ties with background and goes to background.
    assert np.array_equal(cams_to_label(cams, (8, 12), 0.3), [[8, 12, 0], [8, 0, 0]])
    # A threshold above every score leaves only background.
    assert not cams_to_label(cams, (8, 12), 0.95).any()


def test_cams_to_label_checks_shapes_and_ids():
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        cams_to_label(np.zeros((3, 2, 2), np.float32), (8, 12), 0.15)
    # The class count is the classifier's (select_classes); here only background is refused.
    with pytest.raises(ValueError, match=r"object classes \(>= 1\)"):
        cams_to_label(np.zeros((1, 2, 2), np.float32), (0,), 0.15)
    # An image without foreground classes is all background.
    assert np.array_equal(cams_to_label(np.zeros((0, 2, 3), np.float32), (), 0.15), np.zeros((2, 3)))


def test_normalise_cams_divides_by_max_plus_eps():
    cams = np.array([[[0, 2], [4, 1]], [[0, 0], [0, 0]]], dtype=np.float32)
    out = normalise_cams(cams)
    assert out.dtype == np.float32 and out.shape == (2, 2, 2)
    np.testing.assert_allclose(out[0], np.array([[0, 2], [4, 1]]) / (4 + 1e-5), rtol=1e-6)
    assert out[0].max() < 1 and out[0, 1, 0] > 0.99999
    assert not out[1].any()  # an all-zero class stays zero


def test_select_classes_keeps_only_the_image_classes():
    maps = torch.arange(20, dtype=torch.float32).view(1, 20, 1, 1)  # channel c-1 holds c-1
    assert select_classes(maps, (8, 15)).flatten().tolist() == [7.0, 14.0]
    with pytest.raises(ValueError, match="1-20"):
        select_classes(maps, (0,))
    with pytest.raises(ValueError, match="1-5"):  # a 5-class classifier has no class 8
        select_classes(maps[:, :5], (8,))
    with pytest.raises(ValueError, match=r"\(B, N, h, w\)"):
        select_classes(maps[0], (1,))


def test_cam_to_image_size_bilinear_then_crop_by_hand():
    # A 2x2 CAM at stride 2 covers 4x4 pixels of a 3x3 image: bilinear (half-pixel centres)
    # gives rows [0 1 3 4], [2 3 5 6], [6 7 9 10], [8 9 11 12]; the crop keeps the top-left 3x3.
    cam = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])
    out = cam_to_image_size(cam, stride=2, scaled_hw=(3, 3), image_hw=(3, 3))
    assert torch.allclose(out, torch.tensor([[[0.0, 1, 3], [2, 3, 5], [6, 7, 9]]]))
    # At scale 0.5 a 1x1 CAM (stride 4, scaled image 2x2) spans 8x8 original pixels: constant.
    out = cam_to_image_size(torch.full((1, 1, 1), 0.7), stride=4, scaled_hw=(2, 2), image_hw=(4, 4))
    assert out.shape == (1, 4, 4) and torch.allclose(out, torch.full((1, 4, 4), 0.7))


def test_downsample_scores_area_average_by_hand():
    scores = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    small = downsample_scores(scores, max_side=3)
    assert small.dtype == np.float16 and small.shape == (1, 2, 3)
    np.testing.assert_array_equal(small[0], [[3.5, 5.5, 7.5], [15.5, 17.5, 19.5]])
    assert downsample_scores(scores, max_side=6).shape == (1, 4, 6)  # already fits


def test_targets_and_poly_schedule_by_hand():
    target = multilabel_target((8, 15), 20)
    assert target.shape == (20,) and target.dtype == np.float32
    assert np.flatnonzero(target).tolist() == [7, 14]
    assert poly_lr(0.1, 0, 10, 0.9) == pytest.approx(0.1)
    assert poly_lr(0.1, 5, 10, 1.0) == pytest.approx(0.05)
    assert poly_lr(0.1, 9, 10, 0.9) == pytest.approx(0.1 * 0.1**0.9)


def test_augment_rescales_flips_crops_and_pads():
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # values 0..71, never PAD_VALUE
    rng = np.random.default_rng(0)
    # Long side drawn from (6, 6): no rescale. A crop of 8 holds the whole (maybe flipped) image.
    big = augment.augment(rgb, rng, (6, 6), 8)
    assert big.shape == (8, 8, 3) and big.dtype == np.uint8
    inside = (big != augment.PAD_VALUE).all(axis=2)
    assert inside.sum() == 24
    ys, xs = np.nonzero(inside)
    window = big[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert np.array_equal(window, rgb) or np.array_equal(window, rgb[:, ::-1])
    # A crop of 2 is a 2x2 window of the image or of its mirror image.
    small = augment.augment(rgb, rng, (6, 6), 2)
    windows = [im[y : y + 2, x : x + 2] for im in (rgb, rgb[:, ::-1]) for y in range(3) for x in range(5)]
    assert any(np.array_equal(small, w) for w in windows)


def test_registered_with_config_and_paper_preset():
    plugin = registry.get("cam")
    assert plugin.role is Role.METHOD and plugin.config is CAMConfig and plugin.title == "CAM"
    paper = plugin.make_config(cam.PAPER_PARAMS)
    assert paper.scales == (1.0, 0.5, 1.5, 2.0) and paper.crop_size == 512 and paper.flip
    default = CAMConfig()
    assert default.output_stride == 16 and default.flip and 0.1 <= default.bg_threshold <= 0.5
    with pytest.raises(ValueError, match="unknown parameter"):
        plugin.make_config({"threshold": 0.3})


def test_camnet_logits_are_the_mean_of_its_cams():
    net = cam.build_net(TINY, 20).train()
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen = [p.requires_grad for s in net.features.stages[: TINY.frozen_stages] for p in s.parameters()]
    assert frozen and not any(frozen)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = net.class_maps(x)
        assert maps.shape == (2, 20, 4, 6)
        assert torch.allclose(net(x), maps.mean(dim=(2, 3)), atol=1e-5)


def _assert_gradient_close(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Equal up to float rounding: within 0.5 % of the reference's norm. oneDNN sums in another
    order per layout and per CPU (AVX-512 kernels more so), so near-zero entries of a deep layer's
    gradient differ by more than an element-wise rtol while the tensor agrees to ~1e-3."""
    error = float((ours - reference).norm() / reference.norm().clamp_min(1e-12))
    assert error < 5e-3, f"{name}: gradient differs by {error:.1e} of its norm"


def test_channels_last_gives_the_nchw_cams_and_gradients(tmp_path):
    """The engine runs CAM channels-last for speed (``bench.cam_speed``); the CAMs of real images
    and one training step's gradients must be those of the NCHW network up to float rounding."""
    from engine.core.dataset import default_voc_root, read_image
    from engine.ops.backbone import to_input
    from engine.ops.cams import multiscale_cams

    items = split_items(default_voc_root(), "train", 4)
    fast = cam.build_net(TINY, 20).eval()
    assert fast.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    plain = cam.build_net(TINY, 20).to(memory_format=torch.contiguous_format).eval()
    for item in items:
        rgb = read_image(item.image_path)
        ours = normalise_cams(multiscale_cams(fast, rgb, item.labels, (1.0,), True))
        with torch.no_grad():  # the NCHW computation multiscale_cams made before, at scale 1 with the flip
            x = to_input(rgb)[None].contiguous()
            maps = F.relu(select_classes(plain.class_maps(torch.cat([x, x.flip(-1)])), item.labels))
            hw = rgb.shape[:2]
            reference = normalise_cams(cam_to_image_size(maps[0] + maps[1].flip(-1), 16, hw, hw).numpy())
        np.testing.assert_allclose(ours, reference, atol=1e-4)
        differ = cams_to_label(ours, item.labels, 0.3) != cams_to_label(reference, item.labels, 0.3)
        assert differ.mean() < 1e-4  # a tie at the threshold may flip a pixel, no more

    x, target = cam._batch(items, TINY, 20, 0, 0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    fast.train(), plain.train()
    loss = torch.nn.MultiLabelSoftMarginLoss()
    loss(fast(x), target).backward()
    loss(plain(x.contiguous()), target).backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        if a.grad is not None:
            _assert_gradient_close(a.grad, b.grad, name)


def test_onnx_runtime_cams_match_pytorch_on_real_images():
    """CAM labelling on CPU runs through ONNX Runtime (``engine.ops.onnx_runtime``): on real
    images of several sizes (TF "same" padding depends on the size) at scales 1 and 0.5 with
    flips, its CAMs are PyTorch's within 1e-4 and its label maps PyTorch's."""
    from engine.core.dataset import default_voc_root, read_image
    from engine.ops.cams import multiscale_cams
    from engine.ops.onnx_runtime import class_maps_runner

    net = cam.build_net(TINY, 20).eval()
    runner = class_maps_runner(net, "cpu")
    assert runner != net.class_maps  # the export passed its own check
    items = split_items(default_voc_root(), "train", 40)
    sizes = {}
    for item in items:
        sizes.setdefault((item.height, item.width), item)
    assert len(sizes) >= 3
    for item in list(sizes.values())[:4]:
        rgb = read_image(item.image_path)
        ours = normalise_cams(multiscale_cams(net, rgb, item.labels, (1.0, 0.5), True, class_maps=runner))
        reference = normalise_cams(multiscale_cams(net, rgb, item.labels, (1.0, 0.5), True))
        np.testing.assert_allclose(ours, reference, atol=1e-4)
        differ = cams_to_label(ours, item.labels, 0.3) != cams_to_label(reference, item.labels, 0.3)
        assert differ.mean() < 1e-4
    assert class_maps_runner(net, "cuda") == net.class_maps  # GPUs keep PyTorch


def test_frozen_stages_in_onnx_runtime_give_pytorchs_loss_and_gradients():
    """CAM training on CPU computes the frozen stages' output in ONNX Runtime (``frozen_prefix``)
    on the batch thread: on a real batch, the loss and every trained parameter's gradient are
    those of the PyTorch forward within float rounding; no prefix on CUDA or with nothing frozen."""
    from engine.core.dataset import default_voc_root

    items = split_items(default_voc_root(), "train", 4)
    cfg = replace(TINY, frozen_stages=4)
    ours, reference = cam.build_net(cfg, 20), cam.build_net(cfg, 20)
    prefix = cam.frozen_prefix(ours, "cpu")
    assert prefix is not None
    x, target = cam._batch(items, cfg, 20, 0, 0)
    features, same_target = cam._batch(items, cfg, 20, 0, 0, prefix)
    assert features.shape == (4, 40, cfg.crop_size // 8, cfg.crop_size // 8)  # block stage 2: 40 channels, stride 8
    assert features.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(same_target, target)
    ours.train(), reference.train()
    loss = torch.nn.MultiLabelSoftMarginLoss()
    ours_loss = loss(ours(features, first_stage=cfg.frozen_stages), target)
    reference_loss = loss(reference(x), target)
    ours_loss.backward(), reference_loss.backward()
    torch.testing.assert_close(ours_loss, reference_loss, rtol=1e-4, atol=1e-6)
    trained = 0
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            _assert_gradient_close(a.grad, b.grad, name)
            trained += 1
    assert trained > 10
    assert cam.frozen_prefix(ours, "cuda") is None
    assert cam.frozen_prefix(cam.build_net(replace(TINY, frozen_stages=0), 20), "cpu") is None


# ---------------------------------------------------------------- real training and inference

def test_run_end_to_end_on_real_images(tiny_voc, tmp_path):
    train_items = split_items(tiny_voc, "train")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    todo = [*split_items(tiny_voc, "val"), Item("broken", broken, None, (8,), 10, 10), train_items[0]]
    reports = Reports()
    ctx = RunContext(classes=VOC, items=train_items, todo=todo, workdir=tmp_path / "work", report=reports)
    results = list(cam.run(TINY, ctx))

    assert reports.stage("train") == [(1, 3), (2, 3), (3, 3)]  # 12 images, batch 4, one epoch
    assert [r.image_id for r in results] == [i.image_id for i in todo]
    bad = results[-2]
    assert bad.label is None and "broken.jpg" in bad.error
    for item, result in zip(todo, results):
        if item.image_id == "broken":
            continue
        assert result.error is None
        assert result.label.shape == (item.height, item.width) and result.label.dtype == np.uint8
        assert set(np.unique(result.label)) <= {0, *item.labels}
        if len(item.labels) == 1:  # a lone class peaks at ~1 after normalisation, above bg_threshold
            assert item.labels[0] in result.label
        assert result.score_classes == (0, *item.labels)
        k, h, w = result.scores.shape
        assert k == len(item.labels) + 1 and result.scores.dtype == np.float16
        assert max(h, w) == TINY.score_max_side and abs(h / w - item.height / item.width) < 0.05
        assert np.all(result.scores[0] == np.float16(TINY.bg_threshold))
        assert 0 <= result.scores.min() and result.scores[1:].max() <= 1
    model_dir = ctx.model_dir("cam", training_key(TINY, classes=list(VOC.names)))
    assert final_path(model_dir, cam.FAMILY).is_file() and not checkpoint_path(model_dir, cam.FAMILY).exists()


def test_killed_training_resumes_from_its_checkpoint(tiny_voc, tmp_path):
    items = split_items(tiny_voc, "train")
    cfg = replace(TINY, epochs=2, scales=(0.5,), flip=False)  # 6 steps, checkpoints at 2, 3, 4, 6
    workdir = tmp_path / "work"
    model_dir = RunContext(classes=VOC, items=items, todo=[], workdir=workdir).model_dir("cam", training_key(cfg, classes=list(VOC.names)))

    first = Reports(cancel_at=("train", 5))
    with pytest.raises(Cancelled):
        list(cam.run(cfg, RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=first)))
    assert first.stage("train") == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6)]
    assert checkpoint_path(model_dir, cam.FAMILY).is_file() and not final_path(model_dir, cam.FAMILY).exists()

    second = Reports()
    resumed = list(cam.run(cfg, RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=second)))
    assert second.stage("train") == [(5, 6), (6, 6)]  # continues after the step-4 checkpoint
    assert final_path(model_dir, cam.FAMILY).is_file() and not checkpoint_path(model_dir, cam.FAMILY).exists()

    # Same batches and optimiser state: the resumed model equals an uninterrupted run's.
    straight = tmp_path / "straight"
    list(cam.run(cfg, RunContext(classes=VOC, items=items, todo=[], workdir=straight)))
    straight_dir = RunContext(classes=VOC, items=items, todo=[], workdir=straight).model_dir("cam", training_key(cfg, classes=list(VOC.names)))
    a = torch.load(final_path(model_dir, cam.FAMILY), weights_only=True)["model"]
    b = torch.load(final_path(straight_dir, cam.FAMILY), weights_only=True)["model"]
    assert torch.allclose(a["classifier.weight"], b["classifier.weight"], atol=1e-5)

    # Once trained, a rerun only loads the model: no training steps, same labels.
    third = Reports()
    again = list(cam.run(cfg, RunContext(classes=VOC, items=items, todo=items[:2], workdir=workdir, report=third)))
    assert third.stage("train") == []
    assert all(np.array_equal(x.label, y.label) for x, y in zip(resumed, again))


def test_models_are_keyed_by_training_settings_only(tiny_voc, tmp_path):
    items = split_items(tiny_voc, "train")
    ctx = RunContext(classes=VOC, items=items, todo=[], workdir=tmp_path / "work", models=tmp_path / "models")
    # Inference-only settings share the trained model; a training setting gets its own.
    assert ctx.model_dir("cam", training_key(replace(TINY, bg_threshold=0.5), classes=list(VOC.names))) == \
        ctx.model_dir("cam", training_key(TINY, classes=list(VOC.names)))
    assert ctx.model_dir("cam", training_key(replace(TINY, lr=0.5), classes=list(VOC.names))) != \
        ctx.model_dir("cam", training_key(TINY, classes=list(VOC.names)))
    list(cam.run(TINY, ctx))
    steps = Reports()
    list(cam.run(replace(TINY, bg_threshold=0.5), RunContext(classes=VOC, items=items, todo=[], workdir=tmp_path / "other",
                                                              models=tmp_path / "models", report=steps)))
    assert steps.stage("train") == []  # loaded, not retrained

    # A checkpoint written with other settings is refused, naming the file.
    final = final_path(ctx.model_dir("cam", training_key(TINY, classes=list(VOC.names))), cam.FAMILY)
    with pytest.raises(ValueError, match="training settings"):
        load_checked(final, training_key(replace(TINY, lr=0.5), classes=list(VOC.names)))