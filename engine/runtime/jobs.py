"""Queueing work for the worker: the only engine entry point the app calls to start something.

Each variant of a chain (``engine.core.chains``) gets a label job that waits for the job of the
variant before it; the worker (``engine.runtime.worker``) runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cache import queries
from cache.db import connect
from cache.rows import Variant
from engine.core.chains import Step, chain_variants, dataset_id_for
from engine.core import registry
from engine.core.dataset import open_layout

BASELINE = (Step("cam"), Step("dcrf"))  # what `make demo` and Home's baseline button queue


def submit_chain(cache_dir: Path, root: Path, split: str, steps: Sequence[Step] = BASELINE,
                 source_variant_id: str | None = None, after: int | None = None,
                 created_by: str | None = None) -> list[int]:
    """Queue what is missing to have every variant of the chain on ``split``; returns job ids.
    ``created_by``: the signed-in user who asked (team mode), recorded with each new job.

    A variant that already has label maps for all the split's usable images needs no job, and
    a job already queued or running for the same variant and split is reused, so submitting the
    same chain twice queues nothing new. The dataset is scanned first if it never was. ``after``
    is a job the chain's first new job waits for (e.g. the job making ``source_variant_id``).
    Raises ``DatasetError`` when ``root`` is not a dataset (``engine.core.layouts``), ``KeyError``
    for an unknown source variant or plugin, ``ValueError`` for a misplaced step, a bad parameter,
    or a plugin the dataset's class set cannot serve (a method that needs a background class).
    """
    root = Path(root).resolve()
    layout = open_layout(root)  # a wrong path or description fails here, not in the worker
    for step in steps:
        refusal = registry.get(step.name).refusal(layout.classes)
        if refusal:
            raise ValueError(f"{root}: {refusal}")
    dataset_id = dataset_id_for(root)
    job_ids: list[int] = []
    with connect(cache_dir) as con:
        queries.upsert_dataset(con, dataset_id, layout.name or root.name, str(root), layout.classes,
                               layout.layout_name)
        dataset = queries.get_dataset(con, dataset_id)
        dependency = None
        if dataset.scanned_at is None:
            scan = queries.open_job(con, "scan", dataset_id, None, None)
            dependency = scan.id if scan else queries.insert_job(con, "scan", dataset_id, None, None, None, created_by)
            job_ids.append(dependency)
        if after is not None:
            dependency = after  # it waits for the scan itself, if one is queued
        source = queries.get_variant(con, source_variant_id) if source_variant_id else None
        if source_variant_id and source is None:
            raise KeyError(f"no variant {source_variant_id!r} in the cache")
        usable = len(queries.usable_images(con, dataset_id, split)) if dataset.scanned_at else None
        labelled = queries.labelled_in_split(con, dataset_id, split)
        for variant in chain_variants(dataset_id, steps, source):
            queries.insert_variant(con, variant)
            existing = queries.open_job(con, "label", dataset_id, variant.id, split)
            if existing:
                dependency = existing.id
            elif usable is not None and dependency is None and usable and labelled.get(variant.id, 0) >= usable:
                continue  # complete already, and so is everything it depends on
            else:
                dependency = queries.insert_job(con, "label", dataset_id, variant.id, split, dependency,
                                                created_by)
            job_ids.append(dependency)
    return job_ids


def threshold_step(variant: Variant, bg_threshold: float | None = None,
                   class_thresholds: Sequence[float] = ()) -> Step:
    """The chain step that makes ``variant`` again at another background threshold (or one per
    object class, entry c - 1 for class c): its own step with only those inference fields
    changed, so the trained model is reused. Raises ``ValueError`` unless ``variant`` is a
    chain's first step made by a plugin with a threshold sweep (``registry.Plugin.threshold_sweep``)."""
    plugin = registry.get(variant.step)
    if not plugin.threshold_sweep or variant.source_id is not None:
        raise ValueError(f"{variant.name}: only a method with a threshold sweep (e.g. CAM) has a threshold to change")
    params = dict(variant.params)
    if bg_threshold is not None:
        params["bg_threshold"] = float(bg_threshold)
    params["class_thresholds"] = [float(t) for t in class_thresholds]
    plugin.make_config(params)  # a bad value fails here, not in the worker
    return Step(variant.step, params)


def submit_recount(cache_dir: Path, variant_id: str) -> int | None:
    """Queue counting ``variant_id``'s stored label maps again (counts and class confusion of the
    images without confusion rows: a variant recorded before schema 8) on the split it was made
    for; returns the job id, None when nothing is missing. Raises ``KeyError`` for an unknown
    variant."""
    with connect(cache_dir) as con:
        variant = queries.get_variant(con, variant_id)
        split = queries.variant_split(con, variant_id) if variant else None
        if variant is None or split is None:
            raise KeyError(f"no variant {variant_id!r} with label maps in the cache")
        maps = queries.label_map_rows(con, variant_id)
        truth = {r.image_id for r in queries.usable_images(con, variant.dataset_id, split) if r.mask_path}
        if not (truth & set(maps)) - queries.confused_images(con, variant_id):
            return None
        existing = queries.open_job(con, "recount", variant.dataset_id, variant_id, split)
        return existing.id if existing else queries.insert_job(con, "recount", variant.dataset_id, variant_id, split, None)


def cancel(cache_dir: Path, job_ids: Sequence[int]) -> None:
    """Ask the worker to stop these jobs; finished label maps stay in the cache."""
    with connect(cache_dir) as con:
        queries.request_cancel(con, job_ids)
