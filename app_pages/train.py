"""Train: the final segmentation network, DeepLabV3+ (``engine/final/deeplab.py``), trained fully
supervised on a label set of the training split (a method's pseudo-labels, an ISLE merge, or the
ground truth as the upper bound), followed live, and compared by val mIoU across label sets.

ISLE (Ostrowski & Shafique, ISVC'23, shared/papers/isle-class-wise-ensemble.md), Algorithm 3
step 4 and Table 2: every component's pseudo-labels and the ensemble train the same network; the
comparison table here has that shape. The jobs come from ``engine.runtime.trainings.submit_training``;
the curves are ``cache.queries.train_log`` (loss per step, val mIoU per epoch end); the figures are
``engine.runtime.trainings.trainings`` of the evaluation split (cached per-class counts).

Widget keys: "dataset", "train_split", "eval_split", "label_set", "train.<plugin>.<field>" (the
settings), "train_then" (test-time refinements), "train_submit", "follow", "predict_training",
"predict_split", "predict_submit".
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import streamlit as st

from cache import queries, reports
from cache.reports import select_rows
from cache.rows import Job
from engine.core import registry
from engine.core.chains import Step
from engine.core.dataset import DatasetError
from engine.core.registry import Role
from engine.isle import assignments
from engine.runtime.trainings import GROUND_TRUTH, ISLE_PREFIX, final_plugin, submit_training, trainings
from ui.auth import current_user
from ui.charts import column_order, iou_heatmap, loss_curve, miou_bars, truth_note, validation_curve
from ui.common import (
    ACTIVE,
    cache_dir,
    cache_exists,
    data_roots,
    has_active_jobs,
    jobs_panel,
    param_widgets,
    pick_dataset,
    queue_chain,
    read,
    refinement_steps,
    refresh,
)

FINAL = final_plugin()
DEFAULTS = FINAL.make_config()
SHOWN_SETTINGS = {"encoder": "encoder", "epochs": "epochs", "crop_size": "crop", "batch_size": "batch", "lr": "lr"}


# --- small helpers -------------------------------------------------------------------------


def _cli(label_set: str, params: dict, then: list[Step], train_split: str, eval_split: str) -> str:
    """The command line that queues the same training."""
    parts = ["python -m engine"] + ([f"--split {train_split}"] if train_split != "train" else [])
    parts += ["train", label_set if " " not in label_set else json.dumps(label_set)]
    parts += [f"--param {FINAL.name}.{k}={json.dumps(v)}" for k, v in params.items()]
    parts += ([f"--on {eval_split}"] if eval_split != "val" else [])
    parts += (["--then", *(step.name for step in then)] if then else [])
    return " ".join(parts)


def _eta(job: Job) -> str:
    """"about N min left" for a training job, from its rate so far (steps done since it started)."""
    if job.stage != "train" or not job.done or not job.started_at or not job.heartbeat_at:
        return ""
    rate = (job.heartbeat_at - job.started_at) / job.done  # seconds per step
    left = max(rate * (job.total - job.done) - (time.time() - job.heartbeat_at), 0.0)
    finish = time.strftime("%H:%M", time.localtime(time.time() + left))
    return f" · about {left / 60:.0f} min left (≈ {finish})" if left >= 60 else f" · about {left:.0f} s left"


def _setting(params: dict, name: str):
    return params.get(name, getattr(DEFAULTS, name))


# --- page ----------------------------------------------------------------------------------

st.title("Train")
st.caption("The final segmentation network: DeepLabV3+ trained fully supervised on a label set, as in "
           "ISLE's Table 2 (each component's pseudo-labels vs the ensemble vs the ground truth as the "
           "upper bound). The model's predictions on the evaluation split are a variant; its val mIoU "
           "is their IoU against the ground truth.")

dataset = pick_dataset() if cache_exists() else None
splits = read(queries.splits, dataset.id) if dataset else []
if not splits:
    st.info("Nothing to train on yet: queue methods on the Home page first.")
    st.stop()
for key in ("train_split", "eval_split"):  # a split of the dataset picked before
    if st.session_state.get(key) not in (None, *splits):
        st.session_state.pop(key)
left, right = st.columns(2)
train_split = left.selectbox("Training split (the label set's images)", splits, key="train_split",
                             index=splits.index("train") if "train" in splits else 0)
eval_split = right.selectbox("Evaluation split (predicted and scored)", splits, key="eval_split",
                             index=splits.index("val") if "val" in splits else len(splits) - 1)
if train_split == eval_split:
    st.warning("Training and evaluation split are the same: the mIoU then measures fit, not generalisation.")
directory, root = cache_dir(), Path(dataset.root)

# --- launch --------------------------------------------------------------------------------

st.subheader("Launch")
complete = read(assignments.complete_variants, dataset.id, train_split)
shared = Counter(c.variant.name for c in complete)  # a name two variants share gets their ids added
label_sets = {c.variant.id: c.variant.name + (f"  [{c.variant.id}]" if shared[c.variant.name] > 1 else "")
              + ("" if c.default else " (oracle or ensemble)") for c in complete}
label_sets |= {f"{ISLE_PREFIX}{r['name']}": f"ISLE assignment {r['name']!r} (exact merge of its latest version)"
               for r in read(queries.assignment_names, dataset.id, train_split)}
label_sets[GROUND_TRUTH] = "Ground truth (upper bound)"
label_set = st.selectbox("Label set", list(label_sets), format_func=label_sets.get, key="label_set",
                         help=f"Variants with a label map for every image of {train_split}, saved ISLE "
                              "assignments (their merge is queued first if missing), or the ground truth.")
with st.expander(f"Model settings ({FINAL.title})"):
    st.caption("The defaults (Lite0 encoder, 2 epochs, batch 8, crop 256) take about 16 minutes on 2 CPU "
               "cores for the bundled 1,861 training images; the model is reused for any split it predicts.")
    params = param_widgets(FINAL, "train")
then = refinement_steps("train_then", "Test-time refinements of the predictions (e.g. dCRF), each scored too")
st.caption("Command line: `" + _cli(label_set, params, then, train_split, eval_split) + "`")
if st.button("Train", key="train_submit", type="primary"):
    try:
        data_roots().check_steps([Step(FINAL.name, params), *then])  # e.g. encoder_weights: under the roots
        queued = submit_training(directory, root, label_set, params, then=then, split=eval_split,
                                 train_split=train_split, created_by=current_user())
    except (DatasetError, KeyError, ValueError) as exc:
        st.error(str(exc))
    else:
        refresh()
        st.session_state["follow"] = queued.model_variant_id
        st.toast(f"Queued jobs {queued.job_ids}" if queued.job_ids else
                 f"Nothing to do: this training is complete on {eval_split}.")

# --- follow --------------------------------------------------------------------------------

st.subheader("Follow")
models = {v.id: v for v in reversed(read(queries.variants, dataset.id))
          if registry.get(v.step).role is Role.FINAL}  # newest first
if not models:
    st.caption("No training yet.")
else:
    if st.session_state.get("follow") not in models:
        st.session_state.pop("follow", None)
    followed = st.selectbox("Training", list(models), format_func=lambda v: f"{models[v].name}  [{v}]",
                            key="follow")

    def _job(variant_id: str) -> Job | None:
        """The newest job of the variant, one on the evaluation split first."""
        jobs = [j for j in read(queries.recent_jobs, 30) if j.variant_id == variant_id]
        return next((j for j in jobs if j.split == eval_split), jobs[0] if jobs else None)

    def follow(variant_id: str, rendered: str | None) -> None:
        """Progress, ETA and the curves of one training; reruns the page once its job finishes,
        so the comparison below shows the new figures."""
        job = _job(variant_id)
        status = job.status if job else None
        if status != rendered and rendered in ACTIVE:
            st.rerun()
        if job is None:
            st.caption("No job of this training among the recent jobs.")
        elif status in ACTIVE:
            fraction = job.done / job.total if job.total else 0.0
            stage = job.stage or ("waiting for the label set" if job.depends_on else "waiting")
            st.progress(min(fraction, 1.0), text=f"job {job.id} · {status} · {stage} "
                        f"{job.done}/{job.total}{_eta(job)}")
        else:
            st.caption(f"job {job.id} on {job.split}: {status}" + (f" ({job.error})" if job.error else ""))
        log = read(queries.train_log, variant_id)
        if not log:
            st.caption("No curve point yet: the loss appears once the first steps are recorded.")
            return
        loss, val = st.columns(2)
        loss.plotly_chart(loss_curve(log), key="loss_curve")
        if any(r["name"] == "val_miou" for r in log):
            val.plotly_chart(validation_curve(log), key="val_curve")
        else:
            val.caption("Validation mIoU: a point at each epoch end, on the first `val_images` images of "
                        f"{eval_split}.")

    first = _job(followed)
    st.fragment(run_every=2 if has_active_jobs(dataset.id) else None)(follow)(
        followed, first.status if first else None)

st.subheader("Jobs")
jobs_panel()

# --- compare -------------------------------------------------------------------------------

st.subheader("Compare")
rows = read(trainings, dataset.id, eval_split)
if not rows:
    st.caption(f"No trained model has predictions on {eval_split} yet.")
else:
    refinements = list(dict.fromkeys(x.title for r in rows for x in r.refined))  # e.g. ["dCRF"]
    st.dataframe(
        [{"label set": r.label_set, "method": r.label_set_method,
          **{title: _setting(r.params, name) for name, title in SHOWN_SETTINGS.items()},
          "images": r.images, f"{eval_split} mIoU": r.miou,
          **{f"{eval_split} mIoU + {t}": next((x.miou for x in r.refined if x.title == t), None) for t in refinements},
          "variant": r.variant_id, "trained": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))}
         for r in rows],
        hide_index=True, key="trainings",
    )
    st.plotly_chart(miou_bars(rows, FINAL.title), key="miou_bars")
    st.caption(f"Per-class IoU (%) of the trained models' predictions on {eval_split}"
               + (" and their refinements" if refinements else "") + ".")
    shown = [v for r in rows for v in (r.variant_id, *(x.variant_id for x in r.refined))]
    table = select_rows(read(reports.iou_table, dataset.id, eval_split), shown)
    class_images = read(queries.class_image_counts, dataset.id, eval_split)
    if note := truth_note(table):
        st.caption(note)
    if table.with_truth.any():  # classes without images of the split are left out
        st.plotly_chart(iou_heatmap(table, class_images, columns=column_order(table, class_images, hide_empty=True)),
                        key="train_heatmap")

# --- predict -------------------------------------------------------------------------------

st.subheader("Predict")
if not rows:
    st.caption("Predict another split with a trained model once one has finished.")
else:
    st.caption("The trained model's predictions on another split become a variant (inspect, refine or "
               "ensemble them on the other pages). The same model is used: no retraining.")
    by_id = {r.variant_id: r for r in rows}
    left, right = st.columns(2)
    chosen = left.selectbox("Trained model", list(by_id), key="predict_training",
                            format_func=lambda v: f"{by_id[v].name}  [{v}]")
    target = right.selectbox("Split", splits, key="predict_split",
                             index=splits.index(train_split))
    if st.button("Predict", key="predict_submit"):
        model = by_id[chosen]
        queue_chain(root, target, [Step(models[chosen].step, model.params)], model.label_set_id,
                    f"{model.name!r} already predicted every image of {target}")
