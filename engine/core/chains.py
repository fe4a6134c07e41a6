"""Chains and their variants: what a queued job makes.

A chain is a method (or an ensemble, or an oracle) followed by refinements, e.g.
``[Step("cam"), Step("dcrf")]``. Every prefix of a chain is a variant of its own (CAM, then
CAM → dCRF); a variant's id hashes the dataset, its source variant, the step and the step's full
parameters (defaults filled in), so the same chain is the same variant and a changed parameter a
new one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.rows import Variant
from engine import __version__
from engine.core import registry


@dataclass(frozen=True)
class Step:
    """One link of a chain: a registered plugin name and parameters overriding its defaults.

    ``title`` names the step's variant instead of the plugin's title (e.g. the name a user gave
    an imported folder); it is a label only and not part of the variant's identity.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


def dataset_id_for(root: Path) -> str:
    """A stable id for a dataset root: a hash of its resolved path."""
    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _title(title: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """A step's display name: the plugin title plus the parameters that differ from its defaults,
    so two variants of one method are told apart, e.g. "dCRF (iters=5)"."""
    changed = [f"{k}={json.dumps(v)}" for k, v in sorted(params.items()) if defaults.get(k) != v]
    return f"{title} ({', '.join(changed)})" if changed else title


def chain_variants(dataset_id: str, steps: Sequence[Step], source: Variant | None = None) -> list[Variant]:
    """The variants of each prefix of ``steps``, parameters filled with the configs' defaults.

    ``source`` is an existing variant to refine further (then every step follows a variant).
    Raises ``KeyError`` for an unknown plugin and ``ValueError`` for a plugin in a place its role
    does not allow (a refinement first, a method after a variant) or an unknown parameter.
    """
    rows: list[Variant] = []
    parent = source
    for position, step in enumerate(steps):
        plugin = registry.get(step.name)
        first = position == 0 and source is None
        if plugin.role.starts_chain != first:
            wanted = "method (or an ensemble or oracle)" if first else "refinement (or a final training)"
            raise ValueError(f"step {position + 1} ({step.name}) must be a {wanted}, not a {plugin.role.value}")
        params = registry.config_to_params(plugin.make_config(step.params))
        title = step.title or _title(plugin.title, params, registry.config_to_params(plugin.make_config()))
        parent_id = parent.id if parent else None
        variant = Variant(
            id=_hash({"dataset": dataset_id, "source": parent_id, "step": step.name, "params": params}),
            dataset_id=dataset_id,
            name=f"{parent.name} → {title}" if parent else title,
            method=parent.method if parent else step.name,
            step=step.name,
            params=params,
            steps=(*(parent.steps if parent else ()), {"name": step.name, "params": params}),
            source_id=parent_id,
            code_version=__version__,
            created_at=time.time(),
        )
        rows.append(variant)
        parent = variant
    return rows
