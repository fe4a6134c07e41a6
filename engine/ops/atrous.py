"""Dilated (atrous) convolutions trained through their r x r sub-grids, for a fast CPU backward pass.

oneDNN runs a dilated depthwise convolution's forward pass fast but its backward pass on a slow
path, many times the forward's cost (EfficientNet-Lite's last stages at output stride 16:
docs/methods/cam.md). A stride-1 convolution with dilation r and padding ``r * q`` equals,
pixel for pixel, an undilated one with padding ``q`` applied to each of the r * r sub-grids
``x[..., i::r, j::r]`` stacked along the batch, re-interleaved afterwards: the "deinterlacing"
implementation of atrous convolution (Chen et al., DeepLab, TPAMI 2017, Sec. 3.1; TensorFlow
``space_to_batch_nd``). Autograd then runs the fast undilated kernels both ways; the values and
gradients are those of the dilated convolution up to float rounding.

Only training on a CPU where it pays off takes this path (``subgrids_pay_off``: oneDNN's AVX2
kernels); in eval mode, without gradients, on CUDA or on other CPUs the layer is a plain
``nn.Conv2d`` (so inference and the ONNX export see the dilated convolution itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def subgrid_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rate: int, padding: int,
                   groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=rate * padding, dilation=rate, groups=groups)`` (stride
    1) computed on the ``rate * rate`` sub-grids of ``x``.

    x: ``(B, C, H, W) float32`` (any H, W: the sides are zero-padded to a multiple of ``rate``, as
    the dilated convolution's own padding would read them); weight: ``(C_out, C / groups, k, k)``.
    Returns ``(B, C_out, H, W)``, channels-last when ``x`` is.
    """
    batch, channels, height, width = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    h, w = math.ceil(height / rate), math.ceil(width / rate)
    x = F.pad(x, (0, w * rate - width, 0, h * rate - height))
    # (B, C, h, r, w, r) -> (r, r, B, C, h, w): sub-grid (i, j) holds x[..., i::r, j::r]
    grids = x.reshape(batch, channels, h, rate, w, rate).permute(3, 5, 0, 1, 2, 4)
    grids = grids.reshape(rate * rate * batch, channels, h, w).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(grids, weight, bias, padding=padding, groups=groups)
    out = out.reshape(rate, rate, batch, -1, h, w).permute(2, 3, 4, 0, 5, 1).reshape(batch, -1, h * rate, w * rate)
    out = out[:, :, :height, :width]
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def subgrids_pay_off() -> bool:
    """Whether training dilated convolutions through their sub-grids is faster on this CPU than
    oneDNN's own dilated kernels: on its AVX2 kernels (a CAM step's backward 3.26 s -> 1.77 s on an
    AVX2 EPYC), not on its AVX-512 ones (the step slower, 1.08 s -> 1.28 s, on an AVX-512 Xeon;
    docs/methods/cam.md). Decided by ``torch.backends.cpu.get_cpu_capability()``, so a run and
    its resumption take the same path."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


class SubgridConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (stride 1, square dilation r > 1, padding ``r * q``) that trains through
    ``subgrid_conv2d`` on CPU while ``active``; same parameters and state-dict keys."""

    # Class-wide, decided once per process; tests and bench.cam_speed set it to compare both paths.
    active: bool = subgrids_pay_off()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.active and self.training and torch.is_grad_enabled() and x.device.type == "cpu"):
            return super().forward(x)
        return subgrid_conv2d(x, self.weight, self.bias, self.dilation[0], self.padding[0] // self.dilation[0],
                              self.groups)


def _eligible(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, conv.padding
    return (sh, sw) == (1, 1) and dh == dw > 1 and ph == pw and ph % dh == 0


def _swap(model: nn.Module, picked: Callable[[nn.Module], bool], cls: type[nn.Conv2d]) -> int:
    """Replace every ``picked`` conv of ``model`` by a ``cls`` holding the same parameters."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if picked(child)]
    for parent, name, conv in swaps:
        replacement = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                          dtype=conv.weight.dtype)
        replacement.weight, replacement.bias = conv.weight, conv.bias
        replacement.train(conv.training)
        setattr(parent, name, replacement)
    return len(swaps)


def train_dilated_by_subgrids(model: nn.Module) -> int:
    """Replace, in place, every eligible dilated ``nn.Conv2d`` of ``model`` (stride 1, equal
    dilation > 1 on both axes, zero padding a multiple of it) by a ``SubgridConv2d`` holding the
    same parameters. Returns how many were replaced."""
    return _swap(model, _eligible, SubgridConv2d)


def train_dilated_plainly(model: nn.Module) -> int:
    """The inverse of ``train_dilated_by_subgrids`` (every ``SubgridConv2d`` back to an
    ``nn.Conv2d`` with the same parameters), for comparisons. Returns how many were replaced."""
    return _swap(model, lambda m: isinstance(m, SubgridConv2d), nn.Conv2d)
