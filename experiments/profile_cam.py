"""Where the time of one CAM training step and of one image's CAM labelling goes, on this machine.

    python -m experiments.profile_cam [--repeats 3]

Training step: the default ``CAMConfig`` (Lite0, stages 0-3 frozen, batch 16, crop 256) on real
bundled images: decode, augmentation + normalisation, forward, backward, SGD step; then the same
forward + backward on random input stored as float32, as channels-last, and under bfloat16
autocast. Labelling: decode, the forward passes of ``multiscale_cams`` at each scale with the
flip, and the numerics after them (``normalise_cams``, ``peak``, ``cams_to_label``, ``label_at``,
``downsample_scores``). Medians of ``--repeats`` after one untimed run; wall-clock ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.dataset import default_voc_root, open_layout, read_image
from engine.core.layouts import read_split_ids
from engine.methods import cam
from engine.ops import cams
from engine.ops.augment import augment
from engine.ops.backbone import to_input
from engine.ops.scores import downsample_scores
from engine.ops.sweep import label_at, peak


def timed(parts: dict[str, list[float]], name: str, fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    parts.setdefault(name, []).append(time.perf_counter() - start)
    return out


def report(title: str, parts: dict[str, list[float]]) -> None:
    cells = ", ".join(f"{k} {statistics.median(v[1:]) * 1000:.1f}" for k, v in parts.items())
    print(f"{title}: {cells} (ms)")


def training_step(cfg: cam.CAMConfig, paths: list, repeats: int) -> None:
    net = cam.build_net(cfg, 20).train()
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = nn.MultiLabelSoftMarginLoss()
    rng = np.random.default_rng(cfg.seed)
    target = torch.zeros(cfg.batch_size, 20)
    target[:, 11] = 1  # the values do not change the cost
    parts: dict[str, list[float]] = {}
    for step in range(repeats + 1):
        batch = paths[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        rgbs = timed(parts, "decode", lambda: [np.asarray(read_image(p)) for p in batch])
        x = timed(parts, "augment", lambda: torch.stack(
            [to_input(augment(rgb, rng, cfg.resize_long, cfg.crop_size)) for rgb in rgbs]).contiguous(
            memory_format=torch.channels_last))
        loss = timed(parts, "forward", lambda: loss_fn(net(x), target))
        optimiser.zero_grad()
        timed(parts, "backward", loss.backward)
        timed(parts, "SGD step", optimiser.step)
    report("training step", parts)

    def forward_backward(memory_format: torch.memory_format, bf16: bool) -> None:
        torch.manual_seed(0)
        model = cam.build_net(cfg, 20).train().to(memory_format=memory_format)
        x = torch.randn(cfg.batch_size, 3, cfg.crop_size, cfg.crop_size).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss_fn(out.float(), target).backward()

    variants = {"float32": (torch.contiguous_format, False), "channels-last": (torch.channels_last, False),
                "bfloat16 autocast": (torch.contiguous_format, True)}
    parts = {}
    for _ in range(repeats + 1):
        for name, (memory_format, bf16) in variants.items():
            timed(parts, name, forward_backward, memory_format, bf16)
    report("forward + backward on random input (model build included)", parts)


def labelling(cfg: cam.CAMConfig, paths: list, repeats: int) -> None:
    net = cam.build_net(cfg, 20).eval()
    classes = (12,)
    thresholds = cams.class_threshold_vector(cfg.bg_threshold, ())
    parts: dict[str, list[float]] = {}
    for path in paths[:repeats + 1]:
        rgb = timed(parts, "decode", lambda: np.asarray(read_image(path)))
        with torch.no_grad():
            image = to_input(rgb)[None]
            for scale in cfg.scales:
                x = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear", antialias=True)
                timed(parts, f"forward {scale} + flip", net.class_maps, torch.cat([x, x.flip(-1)]))
        raw = timed(parts, "multiscale_cams", cams.multiscale_cams, net, rgb, classes, cfg.scales, cfg.flip)
        normalised = timed(parts, "normalise_cams", cams.normalise_cams, raw)
        score, best = timed(parts, "peak", peak, normalised, classes)
        timed(parts, "cams_to_label", cams.cams_to_label, normalised, classes, cfg.bg_threshold)
        timed(parts, "label_at", label_at, score, best, thresholds)
        timed(parts, "downsample_scores", downsample_scores,
              cams.with_background(normalised, cfg.bg_threshold), cfg.score_max_side)
    report("labelling one image", parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layout = open_layout(default_voc_root())
    split = layout.splits[0]
    cfg = cam.CAMConfig()
    paths = [layout.image_path(split, i) for i in read_split_ids(split)[:cfg.batch_size * (args.repeats + 1)]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    training_step(cfg, paths, args.repeats)
    labelling(cfg, paths, args.repeats)


if __name__ == "__main__":
    main()
