"""Home: the dataset, the variants, the jobs with live progress, and queueing work: the baseline,
any registered method with refinements after it, refinements of an existing variant, and
imported pseudo-labels (a folder of PNG label maps or WSSS npy score dicts)."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from cache import queries
from engine.core import registry
from engine.core.chains import Step
from engine.core.dataset import default_voc_root
from engine.core.registry import Offer
from engine.methods.imported import DEFAULT_BG_THRESHOLDS, FORMATS, KEY_CONVENTIONS, SCORE_KEYS, import_step
from engine.runtime.jobs import BASELINE
from ui.common import cache_exists, data_roots, jobs_panel, pick_dataset, queue_chain, read, refinement_steps
from ui.run_all import whole_comparison
from ui.worker_panel import worker_panel

st.title("ISLE Workbench")
st.caption("Weakly supervised segmentation: compare pseudo-label methods class by class, "
           "then build the ISLE class-wise ensemble.")

dataset = pick_dataset() if cache_exists() else None
root = Path(dataset.root) if dataset else default_voc_root()
SPLIT = "train"  # pseudo-labels are made for the training images (WSSS)
KEYS_HELP = {"index": "0-based foreground indices, class id = key + 1 (IRN)",
             "class_id": "label values of the dataset's classes, a leading 0 = background (PuzzleCAM)"}


st.subheader("Worker")
worker_panel()

st.subheader("Queue work")
st.write(f"On the **{SPLIT}** split of `{root}`. The worker above picks the jobs up.")
# Imports and ISLE merges have forms and pages of their own: they need a folder or an assignment.
methods = {p.name: p.title for p in registry.plugins(offer=Offer.QUEUE) if p.role.starts_chain}
baseline_tab, method_tab, refine_tab, import_tab = st.tabs(
    ["Baseline", "Queue a method", "Refine a variant", "Import pseudo-labels"])

with baseline_tab:
    baseline = " → ".join(registry.get(step.name).title for step in BASELINE)
    st.write(f"The baseline chain: {baseline}.")
    if st.button(f"Queue {baseline}", type="primary", key="queue_baseline"):
        queue_chain(root, SPLIT, list(BASELINE), nothing="every variant of the baseline is complete")

with method_tab:
    method = st.selectbox("Method", list(methods), format_func=methods.get, key="method")
    then = refinement_steps("method_refinements")
    if st.button("Queue", key="queue_method"):
        queue_chain(root, SPLIT, [Step(method), *then])

with refine_tab:
    variants = {v.id: v.name for v in read(queries.variants, dataset.id)} if dataset else {}
    if not variants:
        st.caption("No variants yet: queue a method or import pseudo-labels first.")
    else:
        source = st.selectbox("Variant to refine", list(variants), format_func=variants.get, key="source_variant")
        source_chain = refinement_steps("source_refinements")
        if st.button("Queue refinements", key="queue_refinement", disabled=not source_chain):
            queue_chain(root, SPLIT, source_chain, source)

with import_tab:
    st.write("Pseudo-labels made elsewhere, one file per image named `<image id>.png` (palette or "
             "grey label maps) or `<image id>.npy` (IRN/PuzzleCAM dicts of `keys` and class scores). "
             "Files with problems are listed with the job; the others import.")
    folder = st.text_input("Folder", key="import_folder", placeholder="/path/to/pseudo-labels")
    name = st.text_input("Name of the variant", key="import_name", placeholder="default: the folder's name")
    fmt = st.radio("Format", FORMATS, horizontal=True, key="import_format")
    params: dict = {"format": fmt}
    if fmt == "npy":
        score_key = st.selectbox("Scores", ["first present", *SCORE_KEYS], key="import_score_key",
                                 help=f"first present, in the order {', '.join(SCORE_KEYS)}")
        params["keys"] = st.selectbox("Keys", KEY_CONVENTIONS, format_func=KEYS_HELP.get, key="import_keys")
        params["bg_threshold"] = st.number_input(
            "Background threshold", min_value=0.0, max_value=1.0, value=None, step=0.05, key="import_threshold",
            placeholder=", ".join(f"{k}: {v}" for k, v in DEFAULT_BG_THRESHOLDS.items()),
            help="constant background score when the file has one channel per key; empty = by score key (IRN)")
        params["score_key"] = None if score_key == "first present" else score_key
    if st.button("Import", key="queue_import", disabled=not folder.strip()):
        try:
            data_roots().check_read(folder.strip(), "import folder")  # before anything is read
            step = import_step(folder.strip(), name, **params)
        except (OSError, ValueError) as exc:
            st.error(str(exc))
        else:
            queue_chain(root, SPLIT, [step])

st.write("Or every method and standard chain of the comparison at once, with estimated times:")
whole_comparison(root, SPLIT)


st.subheader("Jobs")
jobs_panel()

if dataset:
    st.subheader("Dataset")
    classes = dataset.classes
    kind = "label 0 is background" if classes.has_background else "no background class"
    st.caption(f"{classes.num_classes} classes ({kind}; layout {dataset.layout or 'VOCdevkit'}).")
    with st.expander("Classes"):
        st.dataframe([{"label": c, "class": classes.name(c)} for c in range(classes.num_classes)], hide_index=True)
    st.dataframe(read(queries.split_summary, dataset.id), hide_index=True)
    problems = read(queries.image_problems, dataset.id)
    if problems:
        with st.expander(f"{len(problems)} image(s) with a problem, left out of every job"):
            st.dataframe(problems, hide_index=True)
    st.subheader("Variants")
    variants = read(queries.variants, dataset.id)
    if variants:
        st.dataframe(
            [{"variant": v.name, "id": v.id, "method": v.method, "label maps": v.n_label_maps,
              "parameters": json.dumps(v.params, sort_keys=True)} for v in variants],
            hide_index=True,
        )
    else:
        st.info("No variants yet.")
