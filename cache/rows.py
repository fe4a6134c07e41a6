"""Typed rows of the cache's tables, as the queries return them (``cache/queries.py``).

Frozen dataclasses, one per table the engine and the app pass around; JSON columns are decoded.
Built from a query's column names with ``from_row``, so a column a query adds (a join's
``variant_name``) fills the matching optional field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from cache.classes import VOC, ClassSet

def _fields(cls: type, row: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in row.items() if k in names}


@dataclass(frozen=True)
class Dataset:
    """A registered dataset root; id = hash of its resolved path (``engine.core.chains``).

    classes: its class set (a cache made before class sets were stored holds VOC datasets only);
    layout: ``"vocdevkit"``, ``"coco2014"`` or the path of its description file.
    """

    id: str
    name: str
    root: str
    scanned_at: float | None = None
    classes: ClassSet = VOC
    layout: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Dataset:
        values = _fields(cls, row)
        text = values.pop("classes", None)
        return cls(**values, classes=ClassSet.from_json(text) if text else VOC)


@dataclass(frozen=True)
class ImageRow:
    """One image of a split. labels: image-level foreground class ids; problem: None for a
    usable image, else the bad file and what is wrong."""

    dataset_id: str
    split: str
    image_id: str
    image_path: str
    mask_path: str | None
    height: int
    width: int
    labels: tuple[int, ...]
    problem: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ImageRow:
        values = _fields(cls, row)
        return cls(**{**values, "labels": tuple(int(c) for c in values["labels"])})


@dataclass(frozen=True)
class Variant:
    """A method followed by a chain of refinements, with its parameters.

    params: the last step's parameters; steps: the whole chain, ``({"name", "params"}, ...)``.
    n_label_maps: label maps recorded so far (filled by ``queries.variants``).
    """

    id: str
    dataset_id: str
    name: str
    method: str
    step: str
    params: dict[str, Any]
    steps: tuple[dict[str, Any], ...]
    source_id: str | None
    code_version: str
    created_at: float
    n_label_maps: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Variant:
        values = _fields(cls, row)
        return cls(**{**values, "params": json.loads(values["params"]), "steps": tuple(json.loads(values["steps"]))})

    def to_row(self) -> dict[str, Any]:
        """The ``variants`` columns, JSON encoded as stored."""
        row = dataclasses.asdict(self)
        row.pop("n_label_maps")
        return {**row, "params": json.dumps(self.params, sort_keys=True),
                "steps": json.dumps(list(self.steps), sort_keys=True)}


@dataclass(frozen=True)
class Job:
    """A queued, running or finished job (states: ``cache.schema.JobStatus``).

    kind "scan" registers a dataset; kind "label" makes a variant's label maps for a split.
    variant_name and dependency_status are filled by the queries that join them.
    """

    id: int
    kind: str
    dataset_id: str
    variant_id: str | None
    split: str | None
    status: str
    stage: str | None
    done: int
    total: int
    n_errors: int
    error: str | None
    depends_on: int | None
    cancel_requested: bool
    attempts: int
    max_attempts: int
    worker: str | None
    created_at: float
    started_at: float | None
    heartbeat_at: float | None
    finished_at: float | None
    created_by: str | None = None  # the signed-in user who queued it (team mode), else None
    variant_name: str | None = None
    dependency_status: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(**_fields(cls, row))


@dataclass(frozen=True)
class WorkerRow:
    """A ``workers`` row: a worker process that served this cache (``engine.runtime.supervisor``).

    name: ``"host:pid"``; times are epoch seconds; job_id: the job it runs (None: idle);
    stopped_at: when it exited (None: running, or killed without a chance to say so).
    """

    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    job_id: int | None
    ray_address: str | None
    stop_requested: bool
    stopped_at: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkerRow:
        return cls(**_fields(cls, row))
