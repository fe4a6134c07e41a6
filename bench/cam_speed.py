"""Benchmark: CAM training steps and CAM labelling as the engine runs them against the PyTorch
NCHW code it ran before, in one run on this machine.

    python -m bench.cam_speed [--steps 4] [--images 8]

- **training step**, its batch included (the engine's against NCHW with plain dilated
  convolutions, channels-last alone, and channels-last with sub-grids): the default ``CAMConfig``
  (Lite0, stages 0-3 frozen, batch 16, crop 256) on real bundled crops (``cam._batch``): batch,
  forward, ``MultiLabelSoftMarginLoss``, backward, SGD step. The engine runs channels-last, trains
  the dilated convolutions through their sub-grids where that pays off on the CPU
  (``engine.ops.atrous.subgrids_pay_off``: AVX2) and makes each batch,
  with its frozen stages' output in ONNX Runtime (``cam.frozen_prefix``), on a thread while the
  previous step trains (``Training.prefetch``). All start from the same weights and see the same
  batches; the first step of each is untimed.
- **labelling** (ONNX Runtime on CPU, ``engine.ops.onnx_runtime``, against PyTorch NCHW):
  ``multiscale_cams`` (scales 1.0 and 0.5, each with its flip, one batch of 2) on real VOC train
  images; the baseline is the same loop with NCHW input to PyTorch under ``torch.no_grad``.

Prints the median seconds of each, the ratio new / old (the target is below 1), and the largest
difference of the normalised CAMs and the share of label pixels that differ between layouts.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.dataset import default_voc_root, read_image, scan_chunks, to_item
from engine.methods import cam
from engine.ops import cams
from engine.ops.atrous import SubgridConv2d, subgrids_pay_off
from engine.ops.backbone import to_input
from engine.ops.onnx_runtime import class_maps_runner
from engine.ops.scores import strided_to_image


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def nchw_multiscale_cams(net: nn.Module, rgb: np.ndarray, classes: tuple[int, ...],
                         scales: tuple[float, ...]) -> np.ndarray:
    """The engine's ``multiscale_cams`` before channels-last (NCHW input, ``no_grad``), with flips."""
    height, width = rgb.shape[:2]
    total = torch.zeros((len(classes), height, width))
    image = to_input(rgb)[None]
    for scale in scales:
        scaled_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = image if scaled_hw == (height, width) else F.interpolate(
            image, size=scaled_hw, mode="bilinear", align_corners=False, antialias=scale < 1)
        x = torch.cat([x, x.flip(-1)])
        maps = F.relu(cams.select_classes(net.class_maps(x), classes))
        total += strided_to_image(maps[0] + maps[1].flip(-1), net.features.output_stride, scaled_hw, (height, width))
    return total.numpy()


def training(cfg: cam.CAMConfig, items: list, steps: int) -> list[float]:
    """Median seconds of a training step, its batch included: NCHW with plain dilated convolutions
    (the code before this work), channels-last with plain dilated convolutions, channels-last with
    sub-grid dilated convolutions, and the engine's (channels-last, sub-grids where
    ``subgrids_pay_off`` on this CPU, each batch and its frozen stages' output made in ONNX
    Runtime on a thread while the previous step trains)."""
    loss_fn = nn.MultiLabelSoftMarginLoss()
    seconds = []
    for memory_format, subgrids, ahead in ((torch.contiguous_format, False, False),
                                           (torch.channels_last, False, False), (torch.channels_last, True, False),
                                           (torch.channels_last, subgrids_pay_off(), True)):
        SubgridConv2d.active = subgrids
        net = cam.build_net(cfg, 20).to(memory_format=memory_format).train()
        prefix = cam.frozen_prefix(net, "cpu") if ahead else None
        first_stage = net.frozen_stages if prefix is not None else 0
        net.train()
        optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum)
        make = functools.partial(cam._batch, items, cfg, 20, 0, prefix=prefix)
        with ThreadPoolExecutor(1) as loader:
            step = iter(range(steps + 1))
            next_batch = loader.submit(make, 0)

            def one_step() -> None:
                nonlocal next_batch
                index = next(step)
                if ahead:
                    x, target = next_batch.result()
                    next_batch = loader.submit(make, index + 1)
                else:
                    x, target = make(index)
                optimiser.zero_grad()
                loss_fn(net(x.contiguous(memory_format=memory_format), first_stage), target).backward()
                optimiser.step()

            seconds.append(_median_seconds(one_step, steps))
    SubgridConv2d.active = subgrids_pay_off()
    return seconds


def labelling(cfg: cam.CAMConfig, items: list, images: int) -> tuple[float, float, float, float]:
    """(PyTorch NCHW seconds, engine seconds, max |CAM difference|, share of label pixels differing)."""
    rgbs = [np.asarray(read_image(it.image_path)) for it in items[:images + 1]]
    labels = [tuple(it.labels) for it in items[:images + 1]]
    old_net = cam.build_net(cfg, 20).to(memory_format=torch.contiguous_format).eval()
    new_net = cam.build_net(cfg, 20).eval()
    runner = class_maps_runner(new_net, "cpu")
    old_iter, new_iter = iter(range(images + 1)), iter(range(images + 1))
    old = _median_seconds(lambda: nchw_multiscale_cams(old_net, rgbs[(i := next(old_iter))], labels[i], cfg.scales),
                          images)
    new = _median_seconds(lambda: cams.multiscale_cams(new_net, rgbs[(i := next(new_iter))], labels[i], cfg.scales, True,
                                                       class_maps=runner), images)
    worst, differing, pixels = 0.0, 0, 0
    for rgb, classes in zip(rgbs, labels):
        a = cams.normalise_cams(nchw_multiscale_cams(old_net, rgb, classes, cfg.scales))
        b = cams.normalise_cams(cams.multiscale_cams(new_net, rgb, classes, cfg.scales, True, class_maps=runner))
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
        differing += int((cams.cams_to_label(a, classes, cfg.bg_threshold)
                          != cams.cams_to_label(b, classes, cfg.bg_threshold)).sum())
        pixels += rgb.shape[0] * rgb.shape[1]
    return old, new, worst, differing / pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per layout")
    parser.add_argument("--images", type=int, default=8, help="timed images per layout")
    args = parser.parse_args()
    cfg = cam.CAMConfig()
    items = []
    for records in scan_chunks(default_voc_root(), "train", processes=1):
        items += [to_item(r) for r in records if r.problem is None and r.labels]
        if len(items) >= cfg.batch_size * (args.steps + 1):
            break
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    nchw, channels_last, subgrids, engine = training(cfg, items, args.steps)
    print(f"training step with its batch ({torch.backends.cpu.get_cpu_capability()}): NCHW {nchw:.2f} s, "
          f"channels-last {channels_last:.2f} s, channels-last with sub-grid dilated convolutions {subgrids:.2f} s, "
          f"the engine (sub-grids {'on' if subgrids_pay_off() else 'off'} here, the batch and frozen stages in ONNX "
          f"Runtime made a step ahead) {engine:.2f} s; ratio engine/NCHW {engine / nchw:.2f}")
    old, new, worst, share = labelling(cfg, items, args.images)
    print(f"labelling one image: PyTorch NCHW {old:.3f} s, ONNX Runtime {new:.3f} s, ratio new/old {new / old:.2f}; "
          f"max |normalised CAM difference| {worst:.1e}, label pixels differing {share:.2e}")


if __name__ == "__main__":
    main()
