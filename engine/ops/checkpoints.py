"""Files a killed job resumes from: atomic torch checkpoints and intermediate label maps in chunks.

A plugin trains into ``RunContext.model_dir(family, training key)`` (the loop is
``engine.ops.training``); a checkpoint file there is rewritten atomically (write a temporary file,
then rename), so a kill mid-write leaves the previous checkpoint intact, and the stored ``params``
are checked on load so a file written with other settings is never silently reused. Label maps a
training derives for itself (ISIM's pseudo-labels, AffinityNet's affinity labels) are written in
chunks of images as they complete, so a killed job recomputes at most one chunk.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.types import Item, LabelResult


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checked(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict saved with ``{"params": params, ...}``.

    Raises ``ValueError`` naming the file when it was written with other training settings.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("params") != params:
        raise ValueError(f"{path} was written with training settings {state.get('params')}, "
                         f"not {params}; delete it to retrain")
    return state


def resume(checkpoint: Path, params: dict[str, Any], net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore ``net`` and ``optimizer`` from ``checkpoint`` when it exists; the step to continue from.

    The checkpoint is a dict with ``model``, ``optimizer``, ``step`` and ``params`` (as saved by the
    methods' training loops); 0 when there is no checkpoint yet. Raises ``ValueError`` (via
    ``load_checked``) when it was written with other training settings.
    """
    if not checkpoint.is_file():
        return 0
    state = load_checked(checkpoint, params)
    net.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def save_training_state(checkpoint: Path, params: dict[str, Any], net: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, step: int, **extra: Any) -> None:
    """Write what ``resume`` reads back (model, optimizer, step, params, plus ``extra``), atomically."""
    save_atomic({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "params": params, **extra}, checkpoint)


def final_path(model_dir: Path, name: str) -> Path:
    """The finished model of ``engine.ops.training.train_resumable``; its presence means "training is done"."""
    return model_dir / f"{name}_model.pt"


def checkpoint_path(model_dir: Path, name: str) -> Path:
    """The training state ``engine.ops.training.train_resumable`` rewrites while it runs."""
    return model_dir / f"{name}_checkpoint.pt"


def save_label_chunk(path: Path, labels: dict[str, np.ndarray]) -> None:
    """Atomically write ``{image_id: (h, w) uint8}`` as a compressed npz (no pickles)."""
    arrays = {f"label_{i}": label for i, label in enumerate(labels.values())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, ids=np.array(list(labels), dtype=str), **arrays)
    os.replace(tmp, path)


def load_label_chunk(path: Path, image_ids: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The labels stored in ``path``, or None when it is absent, damaged or holds other images."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = [str(i) for i in data["ids"]]
            labels = {image_id: data[f"label_{i}"] for i, image_id in enumerate(ids)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return labels if set(ids) <= set(image_ids) else None


def chunked_labels(items: Sequence[Item], chunk_size: int, path_of: Callable[[int], Path],
                   compute: Callable[[Sequence[Item]], Iterable[LabelResult]],
                   report: Callable[[int, int], None]) -> dict[str, np.ndarray]:
    """``{image_id: label}`` for ``items``, computed chunk by chunk and stored as it goes.

    Chunk ``i`` (``chunk_size`` consecutive items) is read from ``path_of(i)`` when a previous run
    stored it, else ``compute(chunk)`` yields one ``LabelResult`` per item (an error result gives
    the image no label) and the chunk is saved. ``report(done, len(items))`` follows every image.
    """
    labels: dict[str, np.ndarray] = {}
    done = 0
    for index in range(math.ceil(len(items) / chunk_size)):
        chunk = items[index * chunk_size : (index + 1) * chunk_size]
        path = path_of(index)
        stored = load_label_chunk(path, [item.image_id for item in chunk])
        if stored is None:
            stored = {}
            for result in compute(chunk):
                if result.label is not None:
                    stored[result.image_id] = result.label
                done += 1
                report(done, len(items))
            save_label_chunk(path, stored)
        else:
            done += len(chunk)
            report(done, len(items))
        labels.update(stored)
    return labels
