"""Saving training state so a killed job resumes: atomic writes of torch checkpoints.

A method trains into ``RunContext.model_dir(family, training_params)``; a checkpoint file there
is rewritten atomically (write a temporary file, then rename), so a kill mid-write leaves the
previous checkpoint intact, and the stored ``params`` are checked on load so a file written with
other settings is never silently reused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


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
