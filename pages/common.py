"""What every page shares: the cache location, cached reads, and the dataset/split pickers.

Reads go through ``cache.db.connect(read_only=True)`` (short-lived, retried while the worker
writes) and are cached with ``st.cache_data`` keyed on ``cache_state``, so a rerun re-reads only
after the worker recorded something new.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from cache import queries, reports
from cache.db import connect, db_path, default_cache_dir
from engine.dataset import default_voc_root
from engine.jobs import dataset_id_for


def cache_dir() -> Path:
    return default_cache_dir()


def cache_exists() -> bool:
    return db_path(cache_dir()).exists()


@st.cache_data(ttl=1, show_spinner=False)
def _state(directory: Path) -> tuple:
    """The cache fingerprint, re-read at most once a second."""
    with connect(directory, read_only=True) as con:
        return queries.cache_state(con)


@st.cache_data(show_spinner=False)
def _read(directory: Path, question: str, key: tuple, *args):
    with connect(directory, read_only=True) as con:
        if question == "iou_table":
            return reports.iou_table(con, *args)
        return getattr(queries, question)(con, *args)


def read(question: str, *args):
    """``cache.queries.<question>(con, *args)`` (or ``iou_table``), cached until the cache changes."""
    directory = cache_dir()
    return _read(directory, question, _state(directory), *args)


def pick_dataset() -> dict | None:
    """A dataset select box (the bundled one first); None when nothing is registered yet."""
    found = read("datasets")
    if not found:
        return None
    default_id = dataset_id_for(default_voc_root())
    found = sorted(found, key=lambda d: d["id"] != default_id)
    return st.selectbox("Dataset", found, format_func=lambda d: f"{d['name']}  ({d['root']})", key="dataset")


def pick_split(dataset_id: str) -> str | None:
    splits = read("splits", dataset_id)
    if not splits:
        return None
    return st.selectbox("Split (the subset the IoU is computed over)", splits,
                        index=splits.index("train") if "train" in splits else 0, key="split")
