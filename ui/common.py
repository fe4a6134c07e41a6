"""What every page shares: the cache location, the one cached read, the dataset/split pickers,
the live jobs panel, and parameter widgets built from a plugin's config dataclass.

``read(fn, *args)`` runs ``fn(con, *args)`` on a ``cache.db.connect(read_only=True)`` connection
(short-lived, retried while the worker writes), cached with ``st.cache_data`` keyed on the
function, its arguments and ``cache_state``, so a rerun re-reads only after the worker recorded
something new.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

from cache import queries
from cache.db import connect, db_path, default_cache_dir
from cache.rows import Dataset
from cache.schema import JobStatus
from engine.core import registry
from engine.core.chains import Step, dataset_id_for
from engine.core.dataset import DatasetError, default_voc_root
from engine.core.registry import Offer, Plugin, Role
from engine.core.roots import DataRoots
from ui.auth import current_user
from engine.runtime import supervisor
from engine.runtime.jobs import cancel, submit_chain

T = TypeVar("T")

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def cache_dir() -> Path:
    return default_cache_dir()


def cache_exists() -> bool:
    return db_path(cache_dir()).exists()


CHECK_SECONDS = 5.0  # how often one session looks for a live worker
_CHECKED = "worker_checked_at"  # session key: when this session last looked


def autostart_on() -> bool:
    return os.environ.get(supervisor.AUTOSTART_ENV, "auto").lower() != "off"


def keep_worker_alive() -> None:
    """Start a worker when the cache exists, none is alive and none is starting; at most once
    every ``CHECK_SECONDS`` per session, and never with ``ISLE_WORKER=off`` or after a Stop."""
    if not autostart_on() or not cache_exists():
        return
    now = time.monotonic()
    if now - st.session_state.get(_CHECKED, -CHECK_SECONDS) < CHECK_SECONDS:
        return
    st.session_state[_CHECKED] = now
    supervisor.ensure_worker(cache_dir(), automatic=True)


@st.cache_data(ttl=1, show_spinner=False)
def _state(directory: Path) -> tuple:
    """The cache fingerprint, re-read at most once a second."""
    with connect(directory, read_only=True) as con:
        return queries.cache_state(con)


def refresh() -> None:
    """Forget the fingerprint after this app wrote to the cache (queued or cancelled a job), so
    the reads of this very run see the change instead of waiting out the one-second TTL."""
    _state.clear()


@st.cache_data(show_spinner=False, max_entries=256)
def _read(directory: Path, state: tuple, name: str, _fn: Callable, *args):
    with connect(directory, read_only=True) as con:
        return _fn(con, *args)


def read(fn: Callable[..., T], *args) -> T:
    """``fn(con, *args)`` on a read-only connection to the cache (``fn`` any query of ``cache`` or
    the engine that takes the connection first, e.g. ``queries.variants``, ``reports.iou_table``),
    cached until the cache changes. Arguments must be hashable by ``st.cache_data``."""
    directory = cache_dir()
    return _read(directory, _state(directory), f"{fn.__module__}.{fn.__qualname__}", fn, *args)


def _describe(dataset: Dataset) -> str:
    """The picker's text: name, root and class count ("… (N classes)")."""
    return f"{dataset.name}  ({dataset.root}; {dataset.classes.num_classes} classes)"


def pick_dataset(select: str | None = None) -> Dataset | None:
    """A dataset select box (the bundled one first); None when nothing is registered yet.

    Each dataset carries its class set (``Dataset.classes``): pages take names and colours from
    the returned dataset. select: a dataset id to switch the picker to (a link's ``?dataset=``);
    an unknown id leaves it as it is.
    """
    found = read(queries.datasets)
    if not found:
        return None
    default_id = dataset_id_for(default_voc_root())
    found = sorted(found, key=lambda d: d.id != default_id)
    chosen = next((d for d in found if d.id == select), None)
    if chosen is not None:
        st.session_state["dataset"] = chosen
    elif (current := st.session_state.get("dataset")) is not None and current not in found:
        # A stored pick whose row changed (re-registered with another class set): match by id.
        st.session_state["dataset"] = next((d for d in found if d.id == getattr(current, "id", None)), found[0])
    return st.selectbox("Dataset", found, format_func=_describe, key="dataset")


def pick_split(dataset_id: str) -> str | None:
    splits = read(queries.splits, dataset_id)
    if not splits:
        return None
    if st.session_state.get("split") not in (None, *splits):  # a split of the dataset picked before
        st.session_state.pop("split")
    return st.selectbox("Split (the subset the IoU is computed over)", splits,
                        index=splits.index("train") if "train" in splits else 0, key="split")


def pick_dataset_and_split(nothing: str, select: str | None = None) -> tuple[Dataset, str]:
    """The dataset and split pickers; shows ``nothing`` and stops the page when there is no
    scanned dataset yet. select: as for ``pick_dataset``."""
    dataset = pick_dataset(select) if cache_exists() else None
    split = pick_split(dataset.id) if dataset else None
    if split is None:
        st.info(nothing)
        st.stop()
    return dataset, split


def has_active_jobs(dataset_id: str) -> bool:
    """Whether a job of the dataset is queued or running (so its results are still arriving)."""
    return cache_exists() and any(j.dataset_id == dataset_id and j.status in ACTIVE
                                  for j in read(queries.recent_jobs, 30))


@st.fragment(run_every=2)
def jobs_panel() -> None:
    """The recent jobs: a progress bar and a cancel button per active job, then the table."""
    if not cache_exists():
        st.info("No cache yet: queue a job to start.")
        return
    keep_worker_alive()
    jobs = read(queries.recent_jobs, 30)
    if not jobs:
        st.info("No jobs yet.")
        return
    active = [j for j in jobs if j.status in ACTIVE]
    for job in active:
        name = job.variant_name or "scan dataset"
        fraction = job.done / job.total if job.total else 0.0
        beat = f", heartbeat {time.time() - job.heartbeat_at:.0f} s ago" if job.heartbeat_at else ""
        left, right = st.columns([5, 1])
        left.progress(min(fraction, 1.0), text=f"job {job.id} · {name} · {job.status} · "
                      f"{job.stage or 'waiting'} {job.done}/{job.total}{beat}")
        if right.button("Cancel", key=f"cancel_{job.id}", disabled=bool(job.cancel_requested)):
            cancel(cache_dir(), [job.id])
            refresh()
    if any(j.status == JobStatus.QUEUED.value for j in active) and not any(
            j.status == JobStatus.RUNNING.value for j in active):
        st.caption("Jobs are queued but none is running: the worker is starting, or was stopped "
                   "(Start on Home, or `python -m engine worker`).")
    st.dataframe(
        [{"job": j.id, "kind": j.kind, "variant": j.variant_name, "split": j.split, "status": j.status,
          "by": j.created_by or "—", "stage": j.stage, "done": j.done, "total": j.total, "bad images": j.n_errors, "error": j.error}
         for j in jobs],
        hide_index=True,
    )
    for job in jobs:
        if job.kind == "label" and job.n_errors:
            with st.expander(f"job {job.id}: {job.n_errors} image(s) skipped for bad input"):
                st.dataframe(read(queries.image_errors, job.id), hide_index=True)


def data_roots() -> DataRoots:
    """The folders under which this app reads and writes for a user (``engine.core.roots``)."""
    return DataRoots.configured(cache_dir())


def queue_chain(root: Path, split: str, steps: list[Step], source_variant_id: str | None = None,
                nothing: str = "every variant of the chain is complete") -> list[int] | None:
    """Submit a chain (``engine.runtime.jobs.submit_chain``) and say what was queued, or why nothing was;
    returns the job ids, or None after showing the error of a refused chain."""
    try:
        data_roots().check_steps(steps)  # a path parameter outside the data roots: refused, unread
        ids = submit_chain(cache_dir(), Path(root), split, steps, source_variant_id, created_by=current_user())
    except (DatasetError, KeyError, ValueError) as exc:
        st.error(str(exc))
        return None
    refresh()
    st.toast(f"Queued jobs {ids}" if ids else f"Nothing to do: {nothing}.")
    return ids


def refinement_steps(key: str, label: str = "Refinements (in this order)") -> list[Step]:
    """An ordered pick of the refinements the app offers (role ``REFINEMENT``, offer ``QUEUE``;
    multiselect ``key``), each with a parameters expander (``param_widgets``); returns the chosen
    ``Step``s with their non-default parameters."""
    refinements = {p.name: p for p in registry.plugins(Role.REFINEMENT, offer=Offer.QUEUE)}
    chain = st.multiselect(label, list(refinements), key=key, format_func=lambda name: refinements[name].title)
    steps = []
    for name in chain:
        with st.expander(f"{refinements[name].title} parameters"):
            steps.append(Step(name, param_widgets(refinements[name], key)))
    return steps


def param_widgets(plugin: Plugin, key: str) -> dict[str, Any]:
    """One widget per field of the plugin's config dataclass, at its default; returns only the
    parameters set to something else (the variant is named and hashed by those).

    int/float: number input; bool: checkbox; str: text input. Other fields (tuples, optional
    paths) keep their default here; ``--param`` on the command line sets them.
    """
    changed = {}
    for field in dataclasses.fields(plugin.config):
        default = field.default
        widget_key = f"{key}.{plugin.name}.{field.name}"
        if isinstance(default, bool):  # before int: a bool is an int
            value = st.checkbox(field.name, value=default, key=widget_key)
        elif isinstance(default, int | float):
            value = st.number_input(field.name, value=default, key=widget_key,
                                    format=None if isinstance(default, int) else "%g")
        elif isinstance(default, str):
            value = st.text_input(field.name, value=default, key=widget_key)
        else:
            continue
        if value != default:
            changed[field.name] = value
    return changed
