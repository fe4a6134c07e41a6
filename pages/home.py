"""Home: the dataset, the variants, the jobs with live progress, and queueing the baseline jobs."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from cache.schema import JobStatus
from engine.dataset import default_voc_root
from engine.jobs import DEFAULT_CHAIN, cancel, submit_chain
from pages.common import cache_dir, cache_exists, pick_dataset, read

st.title("ISLE Workbench")
st.caption("Weakly supervised segmentation: compare pseudo-label methods class by class, "
           "then build the ISLE class-wise ensemble.")

dataset = pick_dataset() if cache_exists() else None
root = Path(dataset["root"]) if dataset else default_voc_root()

st.subheader("Queue the baseline")
st.write(f"CAM, then CAM → dCRF, on the **train** split of `{root}`. "
         "The background worker (`python -m engine worker`) picks the jobs up.")
if st.button("Queue CAM and CAM → dCRF", type="primary", key="queue_baseline"):
    ids = submit_chain(cache_dir(), root, "train", DEFAULT_CHAIN)
    st.toast(f"Queued jobs {ids}" if ids else "Nothing to do: both variants are complete.")


@st.fragment(run_every=2)
def jobs_panel() -> None:
    if not cache_exists():
        st.info("No cache yet: queue a job to start.")
        return
    jobs = read("recent_jobs", 30)
    if not jobs:
        st.info("No jobs yet.")
        return
    active = [j for j in jobs if j["status"] in (JobStatus.QUEUED.value, JobStatus.RUNNING.value)]
    for job in active:
        name = job["variant_name"] or "scan dataset"
        fraction = job["done"] / job["total"] if job["total"] else 0.0
        beat = f", heartbeat {time.time() - job['heartbeat_at']:.0f} s ago" if job["heartbeat_at"] else ""
        left, right = st.columns([5, 1])
        left.progress(min(fraction, 1.0), text=f"job {job['id']} · {name} · {job['status']} · "
                      f"{job['stage'] or 'waiting'} {job['done']}/{job['total']}{beat}")
        if right.button("Cancel", key=f"cancel_{job['id']}", disabled=bool(job["cancel_requested"])):
            cancel(cache_dir(), [job["id"]])
    if any(j["status"] == JobStatus.QUEUED.value for j in active) and not any(
            j["status"] == JobStatus.RUNNING.value for j in active):
        st.caption("Jobs are queued but none is running: is `python -m engine worker` started?")
    st.dataframe(
        [{"job": j["id"], "kind": j["kind"], "variant": j["variant_name"], "split": j["split"],
          "status": j["status"], "stage": j["stage"], "done": j["done"], "total": j["total"],
          "bad images": j["n_errors"], "error": j["error"]} for j in jobs],
        hide_index=True,
    )
    for job in jobs:
        if job["kind"] == "label" and job["n_errors"]:
            with st.expander(f"job {job['id']}: {job['n_errors']} image(s) skipped for bad input"):
                st.dataframe(read("image_errors", job["id"]), hide_index=True)


st.subheader("Jobs")
jobs_panel()

if dataset:
    st.subheader("Dataset")
    st.dataframe(read("split_summary", dataset["id"]), hide_index=True)
    problems = read("image_problems", dataset["id"])
    if problems:
        with st.expander(f"{len(problems)} image(s) with a problem, left out of every job"):
            st.dataframe(problems, hide_index=True)
    st.subheader("Variants")
    variants = read("variants", dataset["id"])
    if variants:
        st.dataframe(
            [{"variant": v["name"], "id": v["id"], "method": v["method"], "label maps": v["n_label_maps"],
              "parameters": v["params"]} for v in variants],
            hide_index=True,
        )
    else:
        st.info("No variants yet.")
