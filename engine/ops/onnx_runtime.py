"""CAM inference on CPU through ONNX Runtime: the same network, executed faster.

``class_maps_runner(net, device)`` exports a trained network's ``class_maps`` (dynamic batch,
height and width) to ONNX in memory with torch's exporter, opens an ONNX Runtime CPU session on
as many threads as torch uses, and checks it against the PyTorch forward on a probe image before
it is used: the CAMs must agree within ``TOLERANCE`` of their peak, else (or when the export
fails) PyTorch runs as before and a warning says why. On CUDA the PyTorch forward is used.

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

# Largest |ONNX Runtime - PyTorch| on the probe, relative to the largest |CAM| (float32 rounding
# of a reordered convolution is ~1e-6 of it).
TOLERANCE = 1e-4
PROBE_HW = (96, 128)  # a small probe: odd strides of the TF "same" padding are covered by any size


class _ClassMapsModule(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.class_maps(x)


def export_class_maps(net: nn.Module) -> bytes:
    """``net.class_maps`` as an ONNX model (opset 17), input ``x: (B, 3, H, W) float32`` with B,
    H, W dynamic, output ``cams: (B, N, h, w) float32``. ``net`` is put in eval mode."""
    net.eval()
    buffer = io.BytesIO()
    probe = torch.zeros(2, 3, *PROBE_HW)
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(_ClassMapsModule(net), (probe,), buffer, input_names=["x"], output_names=["cams"],
                          dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}}, opset_version=17,
                          dynamo=False)
    return buffer.getvalue()


def onnx_class_maps(model: bytes, threads: int) -> ClassMaps:
    """An ONNX Runtime CPU session of ``model`` as a function ``(B, 3, H, W) float32`` ->
    ``(B, N, h, w) float32`` tensor, on ``threads`` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def class_maps(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.detach().contiguous().numpy()})[0])

    return class_maps


def class_maps_runner(net: nn.Module, device: str) -> ClassMaps:
    """The fastest checked way to run ``net.class_maps`` on ``device``: ONNX Runtime on CPU when
    its export matches PyTorch on a probe (``TOLERANCE``), else ``net.class_maps`` itself.
    Export and check take a few seconds once per trained model."""
    if device != "cpu":
        return net.class_maps
    try:
        runner = onnx_class_maps(export_class_maps(net), torch.get_num_threads())
        probe = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, *PROBE_HW), dtype=np.float32))
        with torch.inference_mode():
            expected = net.class_maps(probe.contiguous(memory_format=torch.channels_last))
        error = float((runner(probe) - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    except Exception as exc:  # an exporter or runtime that cannot take this network: PyTorch still can
        log.warning("ONNX Runtime not used for %s (%s: %s); CAMs computed by PyTorch", type(net).__name__,
                    type(exc).__name__, exc)
        return net.class_maps
    if error > TOLERANCE:
        log.warning("ONNX Runtime not used for %s: its CAMs differ from PyTorch's by %.1e of the peak "
                    "(tolerance %.0e)", type(net).__name__, error, TOLERANCE)
        return net.class_maps
    return runner
