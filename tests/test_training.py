"""engine/ops/training.py: the resumable loop with batches made one step ahead on a thread
(``Training.prefetch``), on real VOC crops and a small real network."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.core.dataset import default_voc_root, read_image
from engine.core.types import Cancelled
from engine.ops.backbone import to_input
from engine.ops.cams import multilabel_target
from engine.ops.training import ParamGroup, Training, poly_lr, sgd, train_resumable
from tests.conftest import split_items

STEPS, BATCH, CROP = 6, 2, 48


class _Batches:
    """Batch ``step`` of real VOC images: centre crops and their multi-label targets; records
    which steps were made, on which thread."""

    def __init__(self):
        self.items = split_items(default_voc_root(), "train", STEPS * BATCH)
        self.made: list[tuple[int, str]] = []

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.made.append((step, threading.current_thread().name))
        crops, targets = [], []
        for item in self.items[step * BATCH:(step + 1) * BATCH]:
            rgb = read_image(item.image_path)
            top, left = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
            crops.append(to_input(np.ascontiguousarray(rgb[top:top + CROP, left:left + CROP])))
            targets.append(torch.from_numpy(multilabel_target(item.labels, 20)))
        return torch.stack(crops), torch.stack(targets)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 20))


def _train(net: nn.Module, model_dir: Path, batches: _Batches, prefetch: bool, cancel_after: int | None = None,
           losses: list[float] | None = None) -> None:
    loss_fn = nn.MultiLabelSoftMarginLoss()
    model_dir.mkdir(exist_ok=True)  # the plugins' ctx.model_dir makes it

    def report(done: int) -> None:
        if done == cancel_after:
            raise Cancelled("test")

    train_resumable(net, model_dir, Training(
        name="tiny", key={"test": 1}, total=STEPS, steps_per_epoch=STEPS, checkpoint_every=2,
        groups=lambda: [ParamGroup(list(net.parameters()), 0.1)], optimizer=sgd(0.9, 1e-4),
        lr=lambda step, base: poly_lr(base, step, STEPS, 0.9), batch=batches,
        loss=lambda batch: loss_fn(net(batch[0]), batch[1]), report=report, prefetch=prefetch,
        after_step=None if losses is None else lambda done, loss: losses.append(loss)))


def test_prefetched_batches_train_the_same_weights_with_each_step_made_once_on_the_thread(tmp_path):
    plain, ahead = _Batches(), _Batches()
    plain_losses, ahead_losses = [], []
    a, b = _net(), _net()
    _train(a, tmp_path / "plain", plain, prefetch=False, losses=plain_losses)
    _train(b, tmp_path / "ahead", ahead, prefetch=True, losses=ahead_losses)
    assert [step for step, _ in plain.made] == list(range(STEPS))
    assert sorted(step for step, _ in ahead.made) == list(range(STEPS))  # each step made exactly once
    assert all(name.startswith("tiny-batches") for _, name in ahead.made)
    assert ahead_losses == plain_losses and len(set(plain_losses)) > 1
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_a_cancelled_prefetching_training_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = _net()
    _train(whole, tmp_path / "whole", _Batches(), prefetch=True)
    resumed, first = _net(), _Batches()
    with pytest.raises(Cancelled):
        _train(resumed, tmp_path / "resumed", first, prefetch=True, cancel_after=4)
    # the step after the cancel may have been made ahead, never one beyond it
    assert max(step for step, _ in first.made) <= 4
    again = _Batches()
    _train(resumed := _net(), tmp_path / "resumed", again, prefetch=True)
    assert sorted(step for step, _ in again.made) == [4, 5]  # resumed at the step-4 checkpoint
    for (name, x), y in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_a_batch_that_fails_on_the_thread_raises_in_the_training(tmp_path):
    batches = _Batches()

    def failing(step: int):
        if step == 2:
            raise OSError(f"{batches.items[4].image_path}: unreadable")
        return batches(step)

    net = _net()
    with pytest.raises(OSError, match="unreadable"):
        loss_fn = nn.MultiLabelSoftMarginLoss()
        train_resumable(net, tmp_path, Training(
            name="tiny", key={"test": 1}, total=STEPS, steps_per_epoch=STEPS, checkpoint_every=2,
            groups=lambda: [ParamGroup(list(net.parameters()), 0.1)], optimizer=sgd(0.9, 1e-4),
            lr=lambda step, base: base, batch=failing, loss=lambda batch: loss_fn(net(batch[0]), batch[1]),
            report=lambda done: None, prefetch=True))
    assert (tmp_path / "tiny_checkpoint.pt").is_file()  # steps 0-1 kept
