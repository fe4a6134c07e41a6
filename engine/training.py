"""Queueing and comparing final segmentation trainings (``engine/refine/deeplab.py``).

A training is the chain ``<label set> → DeepLabV3+`` (optionally ``→ dCRF``) run on the
evaluation split: the label set is a variant of the training split (a method's pseudo-labels, an
ISLE merge, or the ground truth), the DeepLabV3+ variant holds the trained model's predictions on
the evaluation split, and its cached counts are the model's per-class IoU there. This module turns
what the user picks into those chains, with the jobs in order, and lists the trainings for the
comparison view (the shape of ISLE Table 2: each component vs the ensemble vs the upper bound).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import queries, reports
from cache.db import connect, db_path
from engine import assignments, registry
from engine.jobs import Step, chain_variants, dataset_id_for, submit_chain

GROUND_TRUTH = "gt"
ISLE_PREFIX = "isle:"


@dataclass(frozen=True)
class Queued:
    """The jobs queued for a training and the variants they make: the label set on the training
    split, the network's predictions on the evaluation split (and their dCRF)."""

    job_ids: list[int]
    label_set_id: str
    model_variant_id: str
    dcrf_variant_id: str | None


def submit_training(cache_dir: Path, root: Path, label_set: str, params: dict[str, Any] | None = None, *,
                    dcrf: bool = False, split: str = "val", train_split: str = "train") -> Queued:
    """Queue the training of DeepLabV3+ on ``label_set`` and its predictions on ``split``.

    label_set: a variant id (complete or being made on ``train_split``), ``"gt"`` (the ground
    truth of ``train_split``, made as the ``ground-truth`` variant if missing) or ``"isle:NAME"``
    (the exact merge of the latest saved version of that ISLE assignment, queued if missing).
    params: ``DeepLabConfig`` fields that differ from the defaults. With ``dcrf`` the predictions
    are also refined by dCRF (a separate variant and figure). Resubmitting queues nothing new.
    Raises ``KeyError`` for an unknown variant or assignment and ``ValueError`` for bad params.
    """
    root = Path(root).resolve()
    dataset_id = dataset_id_for(root)
    registry.get("deeplab").make_config(dict(params or {}))  # bad settings fail before anything is queued
    if label_set == GROUND_TRUTH:
        step = Step("ground-truth")
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
        after = pending["id"] if pending else None
    else:
        source_id = chain_variants(dataset_id, [step])[0]["id"]
        jobs = submit_chain(cache_dir, root, train_split, [step])
        after = jobs[-1] if jobs else None
    steps = [Step("deeplab", dict(params or {}))] + ([Step("dcrf")] if dcrf else [])
    jobs += submit_chain(cache_dir, root, split, steps, source_id, after=after)
    with connect(cache_dir, read_only=True) as con:
        rows = chain_variants(dataset_id, steps, queries.get_variant(con, source_id))
    return Queued(list(dict.fromkeys(jobs)), source_id, rows[0]["id"], rows[1]["id"] if dcrf else None)


def trainings(con: queries.Con, dataset_id: str, split: str = "val") -> list[dict[str, Any]]:
    """Every DeepLabV3+ variant with predictions on ``split``: its label set, settings, images
    predicted, mIoU and per-class IoU in percent, and the mIoU after test-time dCRF when that ran.
    Newest first."""
    table = reports.iou_table(con, dataset_id, split)
    variants = {v["id"]: v for v in queries.variants(con, dataset_id)}
    index = {v: i for i, v in enumerate(table.variant_ids)}
    out = []
    for vid in reversed(table.variant_ids):
        v = variants[vid]
        if v["step"] != "deeplab":
            continue
        row = index[vid]
        crf = next((r for r, s in enumerate(table.source_ids) if s == vid
                    and variants[table.variant_ids[r]]["step"] == "dcrf"), None)
        source = variants.get(v["source_id"], {})
        out.append({
            "variant_id": vid, "name": v["name"], "label_set_id": v["source_id"],
            "label_set": source.get("name", v["source_id"]), "label_set_method": source.get("method"),
            "params": json.loads(v["params"]), "images": int(table.labelled[row]),
            "miou": assignments.percent(table.miou[row]), "iou": [assignments.percent(x) for x in table.iou[row]],
            "dcrf_variant_id": table.variant_ids[crf] if crf is not None else None,
            "miou_dcrf": assignments.percent(table.miou[crf]) if crf is not None else None,
            "created_at": v["created_at"],
        })
    return out
