"""Queueing and comparing final segmentation trainings (``engine/final/deeplab.py``).

A training is the chain ``<label set> → <final training>`` (then optional test-time refinements,
e.g. dCRF) run on the evaluation split: the label set is a variant of the training split (a
method's pseudo-labels, an ISLE merge, or the ground truth), the final training's variant holds
the trained model's predictions on the evaluation split, and its cached counts are the model's
per-class IoU there. This module turns what the user picks into those chains, with the jobs in
order, and lists the trainings for the comparison view (the shape of ISLE Table 2: each component
vs the ensemble vs the upper bound). Plugins are found by role and offer, never by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import queries, reports
from cache.db import connect, db_path
from engine.core import registry
from engine.core.chains import Step, chain_variants, dataset_id_for
from engine.core.registry import Offer, Plugin, Role
from engine.isle import assignments
from engine.runtime.jobs import submit_chain

GROUND_TRUTH = "gt"
ISLE_PREFIX = "isle:"


def final_plugin() -> Plugin:
    """The final segmentation training the Train page offers (role ``FINAL``, offer ``TRAIN``)."""
    found = registry.plugins(Role.FINAL, offer=Offer.TRAIN)
    if not found:
        raise KeyError("no final training plugin is registered")
    return found[0]


def ground_truth_plugin() -> Plugin:
    """The label set made on demand from the ground truth (offer ``LABEL_SET``)."""
    found = registry.plugins(Role.ORACLE, offer=Offer.LABEL_SET)
    if not found:
        raise KeyError("no ground-truth label set plugin is registered")
    return found[0]


@dataclass(frozen=True)
class Queued:
    """The jobs queued for a training and the variants they make: the label set on the training
    split, the network's predictions on the evaluation split, and their test-time refinements."""

    job_ids: list[int]
    label_set_id: str
    model_variant_id: str
    refined_variant_ids: list[str]


def submit_training(cache_dir: Path, root: Path, label_set: str, params: dict[str, Any] | None = None, *,
                    then: Sequence[Step] = (), split: str = "val", train_split: str = "train",
                    created_by: str | None = None) -> Queued:
    """Queue the training of the final network on ``label_set`` and its predictions on ``split``.

    label_set: a variant id (complete or being made on ``train_split``), ``"gt"`` (the ground
    truth of ``train_split``, made if missing) or ``"isle:NAME"`` (the exact merge of the latest
    saved version of that ISLE assignment, queued if missing). params: the final training's
    config fields that differ from the defaults. ``then``: refinements of the predictions (e.g.
    test-time dCRF), each a variant and figure of its own. Resubmitting queues nothing new.
    ``created_by``: the signed-in user (team mode), recorded with each new job.
    Raises ``KeyError`` for an unknown variant or assignment and ``ValueError`` for bad params.
    """
    root = Path(root).resolve()
    dataset_id = dataset_id_for(root)
    final = final_plugin()
    final.make_config(dict(params or {}))  # bad settings fail before anything is queued
    if label_set == GROUND_TRUTH:
        step = Step(ground_truth_plugin().name)
    elif not db_path(cache_dir).exists():
        raise KeyError(f"no variant or saved ISLE assignment {label_set!r}: there is no cache at {cache_dir} yet")
    elif label_set.startswith(ISLE_PREFIX):
        name = label_set[len(ISLE_PREFIX):]
        with connect(cache_dir, read_only=True) as con:
            history = queries.assignment_history(con, dataset_id, train_split, name)
            if not history:
                raise KeyError(f"no saved ISLE assignment {name!r} on {train_split}")
            plan = assignments.rebuild(con, dataset_id, train_split, assignments.decode(history[-1]))
        step = assignments.merge_step(plan, name)
    else:
        step = None
    if step is None:
        source_id, jobs = label_set, []
        with connect(cache_dir, read_only=True) as con:
            if queries.get_variant(con, source_id) is None:
                raise KeyError(f"no variant {source_id!r} in the cache")
            pending = queries.open_job(con, "label", dataset_id, source_id, train_split)
        after = pending.id if pending else None
    else:
        source_id = chain_variants(dataset_id, [step])[0].id
        jobs = submit_chain(cache_dir, root, train_split, [step], created_by=created_by)
        after = jobs[-1] if jobs else None
    steps = [Step(final.name, dict(params or {})), *then]
    jobs += submit_chain(cache_dir, root, split, steps, source_id, after=after, created_by=created_by)
    with connect(cache_dir, read_only=True) as con:
        made = chain_variants(dataset_id, steps, queries.get_variant(con, source_id))
    return Queued(list(dict.fromkeys(jobs)), source_id, made[0].id, [v.id for v in made[1:]])


@dataclass(frozen=True)
class Refined:
    """A refinement of a trained model's predictions (test-time dCRF): its variant and mIoU (%)."""

    variant_id: str
    title: str
    miou: float | None


@dataclass(frozen=True)
class TrainingRow:
    """One trained model with predictions on a split: its label set, settings, images predicted,
    mIoU and per-class IoU in percent (None: no image of the class), and its refinements."""

    variant_id: str
    name: str
    label_set_id: str | None
    label_set: str
    label_set_method: str | None
    params: dict[str, Any]
    images: int
    miou: float | None
    iou: list[float | None]
    refined: tuple[Refined, ...]
    created_at: float


def trainings(con: queries.Con, dataset_id: str, split: str = "val") -> list[TrainingRow]:
    """Every variant of a final training with predictions on ``split``, newest first, each with
    the direct refinements of its predictions (test-time dCRF) that have label maps there."""
    table = reports.iou_table(con, dataset_id, split)
    variants = {v.id: v for v in queries.variants(con, dataset_id)}
    index = {v: i for i, v in enumerate(table.variant_ids)}
    out = []
    for vid in reversed(table.variant_ids):
        v = variants[vid]
        if registry.get(v.step).role is not Role.FINAL:
            continue
        row = index[vid]
        refined = tuple(Refined(table.variant_ids[r], registry.get(variants[table.variant_ids[r]].step).title,
                                assignments.percent(table.miou[r]))
                        for r, s in enumerate(table.source_ids) if s == vid)
        source = variants.get(v.source_id)
        out.append(TrainingRow(
            variant_id=vid, name=v.name, label_set_id=v.source_id,
            label_set=source.name if source else v.source_id, label_set_method=source.method if source else None,
            params=v.params, images=int(table.labelled[row]), miou=assignments.percent(table.miou[row]),
            iou=[assignments.percent(x) for x in table.iou[row]], refined=refined, created_at=v.created_at))
    return out
