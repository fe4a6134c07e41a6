"""engine/ops/atrous.py: dilated convolutions trained through their sub-grids equal the dilated
convolution, alone and inside the CAM network on real VOC crops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.dataset import default_voc_root
from engine.methods import cam
from engine.methods.cam import CAMConfig
from engine.ops.atrous import SubgridConv2d, subgrid_conv2d, train_dilated_by_subgrids, train_dilated_plainly
from engine.ops.backbone import load_feature_extractor
from tests.conftest import split_items


@pytest.mark.parametrize(("channels", "groups", "kernel", "rate", "size", "channels_last"), [
    (24, 24, 5, 2, (16, 16), True),   # EfficientNet-Lite's depthwise case
    (24, 24, 3, 2, (17, 23), False),  # sides that do not divide by the rate
    (8, 1, 3, 4, (13, 10), True),     # a dense convolution at rate 4 (output stride 8)
])
def test_subgrid_conv_equals_the_dilated_conv(channels, groups, kernel, rate, size, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, *size, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels // groups, kernel, kernel, generator=generator)
    bias = torch.randn(channels, generator=generator)
    grad = torch.randn(3, channels, *size, generator=generator)
    results = []
    for fn in (lambda a, w, b: F.conv2d(a, w, b, padding=rate * (kernel // 2), dilation=rate, groups=groups),
               lambda a, w, b: subgrid_conv2d(a, w, b, rate, kernel // 2, groups)):
        a, w, b = (t.clone().requires_grad_(True) for t in (x, weight, bias))
        out = fn(a, w, b)
        out.backward(grad)
        results.append((out.detach(), a.grad, w.grad, b.grad))
    assert results[1][0].shape == (3, channels, *size)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_backbone_trains_its_dilated_convs_by_subgrids_and_infers_with_them_plain():
    """Output stride 16 dilates EfficientNet-Lite0's last 4 depthwise convolutions (8 dilates
    10); stride 32 has none. In eval mode or without gradients the layer is the plain conv."""
    assert sum(isinstance(m, SubgridConv2d) for m in load_feature_extractor(output_stride=16).modules()) == 4
    assert sum(isinstance(m, SubgridConv2d) for m in load_feature_extractor(output_stride=8).modules()) == 10
    assert not any(isinstance(m, SubgridConv2d) for m in load_feature_extractor(output_stride=32).modules())
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
    holder = nn.Sequential(conv, nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2))
    assert train_dilated_by_subgrids(holder) == 1  # stride 2 and dilation 1 stay as they are
    assert isinstance(holder[0], SubgridConv2d) and holder[0].weight is conv.weight
    assert holder[0].state_dict().keys() == conv.state_dict().keys()


def test_the_subgrid_path_is_taken_only_while_active_in_training_on_cpu(monkeypatch):
    """Off (a CPU where oneDNN's dilated kernels are faster, ``atrous.subgrids_pay_off``) the layer trains
    as the plain dilated convolution, bit for bit; on, it trains through the sub-grids."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 5, padding=4, dilation=2, groups=8)
    holder = nn.Sequential(conv)
    train_dilated_by_subgrids(holder)
    x = torch.randn(2, 8, 13, 17)
    plain = F.conv2d(x, conv.weight, conv.bias, padding=4, dilation=2, groups=8)
    holder.train()
    monkeypatch.setattr(SubgridConv2d, "active", False)
    assert torch.equal(holder(x), plain)
    monkeypatch.setattr(SubgridConv2d, "active", True)
    ours = holder(x)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


def test_cam_network_gradients_equal_the_dilated_networks_on_real_crops(monkeypatch):
    """One CAM training batch of real VOC crops: the loss and every trained parameter's gradient
    with sub-grid convolutions equal those of the same weights with plain dilated convolutions."""
    monkeypatch.setattr(SubgridConv2d, "active", True)  # on any CPU, whether or not it pays off there
    cfg = CAMConfig(batch_size=4, crop_size=128, resize_long=(128, 192), frozen_stages=4)
    items = split_items(default_voc_root(), "train", 8)
    ours = cam.build_net(cfg, 20).train()
    plain = copy.deepcopy(ours)
    assert train_dilated_plainly(plain) == 4
    assert not any(isinstance(m, SubgridConv2d) for m in plain.modules())
    plain.train()
    x, target = cam._batch(items, cfg, 20, 0, 0)
    loss = nn.MultiLabelSoftMarginLoss()
    ours_loss, plain_loss = loss(ours(x), target), loss(plain(x), target)
    torch.testing.assert_close(ours_loss, plain_loss, rtol=1e-5, atol=1e-6)
    ours_loss.backward()
    plain_loss.backward()
    trained = 0
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        if a.grad is not None:
            trained += 1
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert trained > 20
