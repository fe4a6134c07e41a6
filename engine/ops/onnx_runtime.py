"""Gradient-free forward passes on CPU through ONNX Runtime: the same network, executed faster.

``checked_onnx(fn)`` exports ``fn`` (a module, or a method such as a trained network's
``class_maps``; image input, dynamic batch, height and width) to ONNX in memory with torch's
exporter, opens an ONNX Runtime CPU session on as many threads as torch uses, and checks it
against the PyTorch forward on a probe before it is used: the outputs must agree within
``TOLERANCE`` of their peak, else (or when the export fails) it gives None and a warning says
why, and PyTorch runs as before. ``class_maps_runner`` is it for CAM labelling (PyTorch on CUDA);
CAM training runs its frozen stages through it (their forward pass needs no gradient).

ONNX Runtime: onnxruntime.ai, "CPU execution provider"; torch.onnx: pytorch.org/docs, "torch.onnx
(TorchScript-based exporter)". Its speed against PyTorch on this machine: ``bench.cam_speed``.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("isle.onnx")

ClassMaps = Callable[[torch.Tensor], torch.Tensor]

# Largest |ONNX Runtime - PyTorch| on the probe, relative to the largest output (float32 rounding
# of a reordered convolution is ~1e-6 of it).
TOLERANCE = 1e-4
PROBE_HW = (96, 128)  # a small probe: odd strides of the TF "same" padding are covered by any size


class _Method(nn.Module):
    """A bound method (e.g. ``net.class_maps``) as a module, for the exporter."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.owner = fn.__self__
        self.name = fn.__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.name)(x)


def _as_module(fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    return fn if isinstance(fn, nn.Module) else _Method(fn)


def export_forward(fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> bytes:
    """``fn`` (a module or a module's method) as an ONNX model (opset 17), input
    ``x: (B, 3, H, W) float32`` with B, H, W dynamic, output ``y``. The module is put in eval
    mode for the export and left so."""
    module = _as_module(fn)
    module.eval()
    buffer = io.BytesIO()
    probe = torch.zeros(2, 3, *PROBE_HW)
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (probe,), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}}, opset_version=17,
                          dynamo=False)
    return buffer.getvalue()


def onnx_forward(model: bytes, threads: int) -> ClassMaps:
    """An ONNX Runtime CPU session of ``model`` as a function ``(B, C, H, W) float32`` tensor ->
    its output tensor (float32), on ``threads`` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.detach().contiguous().numpy()})[0])

    return forward


def checked_onnx(fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> ClassMaps | None:
    """An ONNX Runtime CPU session of ``fn`` (a module or a module's method, ``(B, 3, H, W)
    float32`` in) when its export matches PyTorch on a probe within ``TOLERANCE`` of the peak, else
    None (a warning says why). Export and check take a few seconds once per network. Puts the
    module in eval mode; ``fn``'s output must not depend on the mode afterwards (a trained network,
    or frozen stages with frozen batch norm and no dropout)."""
    module = _as_module(fn)
    try:
        runner = onnx_forward(export_forward(module), torch.get_num_threads())
        probe = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, *PROBE_HW), dtype=np.float32))
        with torch.inference_mode():
            expected = module(probe.contiguous(memory_format=torch.channels_last))
        error = float((runner(probe) - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    except Exception as exc:  # an exporter or runtime that cannot take this network: PyTorch still can
        log.warning("ONNX Runtime not used for %s (%s: %s); PyTorch runs it", _name(fn), type(exc).__name__, exc)
        return None
    if error > TOLERANCE:
        log.warning("ONNX Runtime not used for %s: its output differs from PyTorch's by %.1e of the peak "
                    "(tolerance %.0e)", _name(fn), error, TOLERANCE)
        return None
    return runner


def _name(fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> str:
    return type(fn).__name__ if isinstance(fn, nn.Module) else f"{type(fn.__self__).__name__}.{fn.__name__}"


def class_maps_runner(net: nn.Module, device: str) -> ClassMaps:
    """The fastest checked way to compute the CAMs ``(B, N, h, w) float32`` of a trained network
    on ``device``: ``checked_onnx(net.class_maps)`` on CPU when it matches PyTorch, else
    ``net.class_maps`` itself (always on CUDA)."""
    return (checked_onnx(net.class_maps) if device == "cpu" else None) or net.class_maps
