"""Queueing work for the worker: the only engine entry point the app calls to start something.

A chain is a method followed by refinements, e.g. ``[Step("cam"), Step("dcrf")]``; every prefix of
the chain is a variant of its own (CAM, then CAM → dCRF), and each gets a label job that waits for
the job of the variant before it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache import queries
from cache.db import connect
from engine import __version__, registry
from engine.dataset import check_root


@dataclass(frozen=True)
class Step:
    """One link of a chain: a registered plugin name and parameters overriding its defaults.

    ``title`` names the step's variant instead of the plugin's title (e.g. the name a user gave
    an imported folder); it is a label only and not part of the variant's identity.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


DEFAULT_CHAIN = (Step("cam"), Step("dcrf"))


def dataset_id_for(root: Path) -> str:
    """A stable id for a VOCdevkit root: a hash of its resolved path."""
    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _title(title: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """A step's display name: the plugin title plus the parameters that differ from its defaults,
    so two variants of one method are told apart, e.g. "dCRF (iters=5)"."""
    changed = [f"{k}={json.dumps(v)}" for k, v in sorted(params.items()) if defaults.get(k) != v]
    return f"{title} ({', '.join(changed)})" if changed else title


def chain_variants(dataset_id: str, steps: Sequence[Step], source: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The variant rows of each prefix of ``steps``, parameters filled with the configs' defaults.

    ``source`` is an existing variant row to refine further (then every step is a refinement).
    Raises ``KeyError`` for an unknown plugin and ``ValueError`` for a misplaced kind or an
    unknown parameter.
    """
    rows: list[dict[str, Any]] = []
    parent = source
    for position, step in enumerate(steps):
        plugin = registry.get(step.name)
        wanted = "method" if position == 0 and source is None else "refine"
        if plugin.kind != wanted:
            raise ValueError(f"step {position + 1} ({step.name}) must be a {wanted}, not a {plugin.kind}")
        params = registry.config_to_params(plugin.make_config(step.params))
        title = step.title or _title(plugin.title, params, registry.config_to_params(plugin.make_config()))
        parent_id = parent["id"] if parent else None
        variant_id = _hash({"dataset": dataset_id, "source": parent_id, "step": step.name, "params": params})
        chain = (json.loads(parent["steps"]) if parent else []) + [{"name": step.name, "params": params}]
        row = {
            "id": variant_id,
            "dataset_id": dataset_id,
            "name": f"{parent['name']} → {title}" if parent else title,
            "method": parent["method"] if parent else step.name,
            "step": step.name,
            "params": json.dumps(params, sort_keys=True),
            "steps": json.dumps(chain, sort_keys=True),
            "source_id": parent_id,
            "code_version": __version__,
            "created_at": time.time(),
        }
        rows.append(row)
        parent = row
    return rows


def submit_chain(cache_dir: Path, root: Path, split: str, steps: Sequence[Step] = DEFAULT_CHAIN,
                 source_variant_id: str | None = None, after: int | None = None) -> list[int]:
    """Queue what is missing to have every variant of the chain on ``split``; returns job ids.

    A variant that already has label maps for all the split's usable images needs no job, and
    a job already queued or running for the same variant and split is reused, so submitting the
    same chain twice queues nothing new. The dataset is scanned first if it never was. ``after``
    is a job the chain's first new job waits for (e.g. the job making ``source_variant_id``).
    Raises ``DatasetError`` when ``root`` is not a VOCdevkit root.
    """
    root = check_root(Path(root)).resolve()  # a wrong path fails here, not in the worker
    dataset_id = dataset_id_for(root)
    job_ids: list[int] = []
    with connect(cache_dir) as con:
        queries.upsert_dataset(con, dataset_id, root.name, str(root))
        dataset = queries.get_dataset(con, dataset_id)
        dependency = None
        if dataset["scanned_at"] is None:
            scan = queries.open_job(con, "scan", dataset_id, None, None)
            dependency = scan["id"] if scan else queries.insert_job(con, "scan", dataset_id, None, None, None)
            job_ids.append(dependency)
        if after is not None:
            dependency = after  # it waits for the scan itself, if one is queued
        source = queries.get_variant(con, source_variant_id) if source_variant_id else None
        if source_variant_id and source is None:
            raise KeyError(f"no variant {source_variant_id!r} in the cache")
        usable = len(queries.usable_images(con, dataset_id, split)) if dataset["scanned_at"] else None
        labelled = queries.labelled_in_split(con, dataset_id, split)
        for row in chain_variants(dataset_id, steps, source):
            queries.insert_variant(con, row)
            existing = queries.open_job(con, "label", dataset_id, row["id"], split)
            if existing:
                dependency = existing["id"]
            elif usable is not None and dependency is None and usable and labelled.get(row["id"], 0) >= usable:
                continue  # complete already, and so is everything it depends on
            else:
                dependency = queries.insert_job(con, "label", dataset_id, row["id"], split, dependency)
            job_ids.append(dependency)
    return job_ids


def cancel(cache_dir: Path, job_ids: Sequence[int]) -> None:
    """Ask the worker to stop these jobs; finished label maps stay in the cache."""
    with connect(cache_dir) as con:
        queries.request_cancel(con, job_ids)
