"""The one resumable training loop every trainable plugin uses (CAM, ISIM, TKP-PCL, AffinityNet,
DeepLabV3+), and the learning-rate schedules they share.

A plugin describes its training as a ``Training``: parameter groups with their base learning
rates, the optimiser, a batch for each step, the loss of a batch, the schedule. ``train_resumable``
runs the steps not yet done, checkpoints atomically (``engine.ops.checkpoints``) every
``checkpoint_every`` steps and at every epoch end, and on completion writes the final model; a
killed job resumes at its last checkpoint, and a finished model is only loaded. Batches must
depend only on the step index (the plugins seed their order and augmentation by (seed, epoch,
index)), and ``seed`` reseeds torch's RNG per step (dropout), so a resumed run equals an
uninterrupted one. A plugin calls its training through ``trained_model``, which on a Ray cluster
with a GPU runs it there as one task first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from engine.core.dataset import read_image
from engine.core.types import ImageError, Item, RunContext
from engine.ops.checkpoints import checkpoint_path, final_path, load_checked, resume, save_atomic, save_training_state

T = TypeVar("T")


def batch_draw(n_items: int, batch_size: int, seed: int, epoch: int, index: int
               ) -> tuple[np.ndarray, np.random.Generator]:
    """Batch ``index`` of ``epoch``: its item indices ``(<= batch_size,) int64`` (a permutation of
    the ``n_items`` seeded by (seed, epoch); the last partial batch is never drawn when the epoch
    has ``n_items // batch_size`` steps) and its augmentation RNG, seeded by (seed, epoch, index),
    so a resumed run sees the same batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    return order[index * batch_size : (index + 1) * batch_size], np.random.default_rng([seed, epoch, index, 1])


def readable(items: Sequence[Item], indices: Iterable[int]) -> Iterator[tuple[Item, np.ndarray]]:
    """``(item, rgb (H, W, 3) uint8)`` for each ``items[j]`` whose image still decodes; the items
    were validated when the dataset was scanned, so a file broken since is left out of training."""
    for j in indices:
        try:
            yield items[j], read_image(items[j].image_path)
        except ImageError:
            continue


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """DeepLab "poly" schedule used by PSA/IRN/isim: ``base_lr * (1 - step / total_steps) ** power``."""
    return base_lr * (1 - step / total_steps) ** power

@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained at one base learning rate (e.g. backbone 0.02, new classifier 0.2)."""

    params: Sequence[nn.Parameter]
    lr: float


def sgd(momentum: float, weight_decay: float) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """An optimiser factory for ``Training.optimizer``: SGD with momentum (PSA/IRN/isim)."""
    return lambda groups: torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)


def adam() -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """An optimiser factory for ``Training.optimizer``: Adam with torch's defaults (TKP-PCL Sec. 4.1)."""
    return lambda groups: torch.optim.Adam(groups)


@dataclass(frozen=True)
class Training:
    """One resumable training of ``net`` into ``model_dir``.

    name: file prefix (``<name>_checkpoint.pt`` while training, ``<name>_model.pt`` when done).
    key: the training settings (``registry.training_key``), stored in every file and checked on
        load, so a file written with other settings is refused, never reused.
    groups: called once when there is training to do; the optimiser gets one group per entry.
    optimizer: builds the optimiser from ``[{"params", "lr"}, ...]`` (``sgd``, ``adam``).
    lr: ``lr(step, base_lr)`` of each group at a step (e.g. ``poly_lr``).
    batch: ``batch(step)``, called in train mode; None skips the step's update (an unreadable
        batch) but not its bookkeeping.
    prefetch: make step ``i + 1``'s batch on a thread while step ``i`` trains (JPEG decoding and
        resizing release the GIL, and a step leaves a core partly idle). Only for a ``batch``
        that depends on nothing but the step (not on the net, which is training meanwhile).
    loss: a batch's scalar loss tensor.
    seed: ``seed(step)`` reseeds torch's RNG for that step's loss and backward pass (dropout draws);
        None leaves the RNG alone.
    after_step: ``after_step(done, loss or None)`` after the update, before the checkpoint (a
        loss curve, a validation at an epoch end).
    report: ``report(done)`` after each step; may raise ``Cancelled``, which propagates.
    extra: saved with the model and every checkpoint (e.g. an embedding size the net is built from).
    threads: torch intra-op threads while training (None: as set).
    """

    name: str
    key: dict[str, Any]
    total: int
    steps_per_epoch: int
    checkpoint_every: int
    groups: Callable[[], Sequence[ParamGroup]]
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    lr: Callable[[int, float], float]
    batch: Callable[[int], Any | None]
    loss: Callable[[Any], torch.Tensor]
    report: Callable[[int], None]
    seed: Callable[[int], int] | None = None
    after_step: Callable[[int, float | None], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    device: str = "cpu"
    prefetch: bool = False


def trained_model(train: Callable[[Any, RunContext], T], cfg: Any, ctx: RunContext) -> T:
    """``train(cfg, ctx)``, a plugin's training, run where it is fastest: in this process, or, when the worker runs with a
    Ray cluster (``ctx.ray_address``) that has a GPU and this machine has none, first as one Ray
    task on a GPU node (``engine.ops.ray_pool.train_remotely``), whose final model this call then
    loads. A training is one process, so a cluster of CPU nodes gains nothing from moving it."""
    if ctx.ray_address is not None and ctx.device == "cpu":
        from engine.ops import ray_pool  # imported only when used: a local run needs no Ray

        if ray_pool.cluster_has_gpu(ctx.ray_address):
            ray_pool.train_remotely(train, cfg, ctx)
    return train(cfg, ctx)


def trained_state(model_dir: Path, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The finished model file of a training (``model``, ``step``, ``params`` and its ``extra``),
    or None while it is not finished. Raises ``ValueError`` when it was written with another key."""
    final = final_path(model_dir, name)
    return load_checked(final, key) if final.is_file() else None


def train_resumable(net: nn.Module, model_dir: Path, training: Training) -> None:
    """Run every step of ``training`` not yet done; leaves ``net`` in eval mode.

    A finished training is only loaded. Otherwise the loop resumes from the checkpoint (model,
    optimiser, step), writes it every ``checkpoint_every`` steps and at every epoch end, and at
    the end saves the final model and removes the checkpoint. ``net`` is put in train mode
    before each step. Raises ``ValueError`` when a stored file was written with another key.
    """
    finished = trained_state(model_dir, training.name, training.key)
    if finished is not None:
        net.load_state_dict(finished["model"], strict=True)
        net.eval()
        return
    checkpoint = checkpoint_path(model_dir, training.name)
    groups = list(training.groups())
    optimizer = training.optimizer([{"params": list(g.params), "lr": g.lr} for g in groups])
    start = resume(checkpoint, training.key, net, optimizer)
    devices = [torch.device(training.device).index or 0] if training.device.startswith("cuda") else []
    with torch_threads(training.threads), _batches(training, start) as batches:
        for index, batch in zip(range(start, training.total), batches):
            net.train()
            loss_value = None
            if batch is not None:
                for group, spec in zip(optimizer.param_groups, groups):
                    group["lr"] = training.lr(index, spec.lr)
                with torch.random.fork_rng(devices=devices, enabled=training.seed is not None):
                    if training.seed is not None:
                        torch.manual_seed(training.seed(index))
                    loss = training.loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                if training.after_step is not None:
                    loss_value = loss.item()
            done = index + 1
            if training.after_step is not None:
                training.after_step(done, loss_value)
            if done % training.checkpoint_every == 0 or done % training.steps_per_epoch == 0:
                save_training_state(checkpoint, training.key, net, optimizer, done, **training.extra)
            training.report(done)
    save_atomic({"model": net.state_dict(), "step": training.total, "params": training.key, **training.extra},
                final_path(model_dir, training.name))
    checkpoint.unlink(missing_ok=True)
    net.eval()


@contextmanager
def _batches(training: Training, start: int) -> Iterator[Iterator[Any]]:
    """``training.batch(i)`` for the steps from ``start``: made when asked for, or with
    ``prefetch`` one step ahead on a thread."""
    steps = range(start, training.total)
    if not training.prefetch:
        yield (training.batch(i) for i in steps)
        return
    with ThreadPoolExecutor(1, thread_name_prefix=f"{training.name}-batches") as loader:
        ahead = deque(loader.submit(training.batch, i) for i in steps[:1])

        def batches() -> Iterator[Any]:
            for i in steps:
                if i + 1 < training.total:
                    ahead.append(loader.submit(training.batch, i + 1))
                yield ahead.popleft().result()

        try:
            yield batches()
        finally:
            for future in ahead:
                future.cancel()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (None: unchanged), then restore."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
