"""ISLE ensemble: pick candidate variants, let Algorithm 2 (or the stable rule) choose the best
one per object class, override any class, watch the predicted IoU beside its cross-validated gain
and each class's bootstrap confidence, run the exact merge (Algorithm 3), save named assignments
with history, compare with naive ISLE, and export the ensemble as a VOCdevkit folder.

Ostrowski & Shafique, ISVC'23 (shared/papers/isle-class-wise-ensemble.md), Sec. 3. The numbers
are ``engine.isle.assignments.plan_view`` (cached per-class counts, no label map decoded) and,
for what survives off-sample, ``validation_view`` and ``budget_view`` (``engine/isle/validation.py``);
the merges are chain steps the worker runs.

The editor's state lives in ``st.session_state``: the widgets' keys ("candidates", "subset_mode",
"fraction", "seed", "rule" (overlap rule), "assign_rule" and "assign_margin" (the assignment rule,
margin in IoU points), "choice_<class id>", "assignment_name") and "overrides" ``{class id:
variant id}``, the classes the user set apart from the assignment rule's choice; "budget_shown"
once the budget curve was asked for.
"""

from __future__ import annotations

import dataclasses
import html
import time
from pathlib import Path

import streamlit as st

from cache import qa, queries
from cache.db import connect
from engine.core.roots import PathRefused
from engine.isle import assignments
from engine.isle.assignments import AssignRule, ClassConfidence, ClassSummary
from engine.isle.export import IMAGE_MODES, ExportError, export_assignment
from engine.isle.numerics import OVERLAP_RULES, Subset
from ui.auth import current_user
from ui.charts import budget_chart
from ui.common import (cache_dir, data_roots, has_active_jobs, jobs_panel, pick_dataset_and_split, queue_chain, read,
                       refresh)

RULES = {"score": "score: the class whose variant is more confident at the pixel (precision where "
                  "a variant stored no scores)",
         "precision": "precision: the class whose chosen variant has the higher per-class precision "
                      "TP / (TP + FP) on the selection images"}
ASSIGN_RULES = {"algorithm2": "Algorithm 2: each class's best candidate on the selection images (the paper)",
                "stable": "stable: a class leaves the best single candidate only where the bootstrap "
                          "interval of its IoU gain lies above a margin"}
VERDICTS = {"sure": "green", "likely": "blue", "coin flip": "orange", "tied": "gray", "only candidate": "gray",
            "no images": "gray"}
CV_FOLDS = 5  # k of the cross-validation (fewer when the selection has fewer images with ground truth)
BUDGET_DRAWS = 20  # seeded draws per size of the labelled-budget curve
SUBSETS = {"whole": "whole split (as in the paper)", "fraction": "a seeded fraction selects, the rest reports"}
IMAGES = {"link": "symlink the JPEGs", "copy": "copy the JPEGs", "none": "labels only"}
CONFLICT_ROWS = 15


# --- editor state --------------------------------------------------------------------------


def _override(class_id: int) -> None:
    """A class's select box changed: remember the pick (pruned below if it equals the rule's choice)."""
    st.session_state.setdefault("overrides", {})[class_id] = st.session_state[f"choice_{class_id}"]


def _restore(versions: dict[int, dict]) -> None:
    """Put the version picked in "restore_version" (an id of ``versions``) back into the editor:
    candidates, subset, overlap and assignment rules and its exact choice."""
    saved = assignments.decode(versions[st.session_state["restore_version"]])
    st.session_state["candidates"] = list(saved.candidates)
    st.session_state["subset_mode"] = "whole" if saved.subset.fraction >= 1.0 else "fraction"
    if saved.subset.fraction < 1.0:
        st.session_state["fraction"] = min(max(saved.subset.fraction, 0.05), 0.95)
    st.session_state["seed"] = int(saved.subset.seed)
    st.session_state["exclude"] = tuple(saved.subset.exclude)
    st.session_state["rule"] = saved.rule
    st.session_state["assign_rule"] = saved.assign.name
    st.session_state["assign_margin"] = round(100 * saved.assign.margin, 6)
    # The whole stored choice as overrides reproduces it exactly even if today's counts would make
    # Algorithm 2 choose otherwise; overrides equal to today's auto choice are pruned after.
    st.session_state["overrides"] = dict(saved.choice)
    st.session_state["assignment_name"] = saved.name
    st.session_state["restored"] = f"Restored {saved.name!r} (id {saved.id}) into the editor."


def _pct(value: float | None, signed: bool = False, decimals: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:+.{decimals}f}".replace("-", "\u2212") if signed else f"{value:.{decimals}f}"


def _delta(value: float | None, reference: float | None) -> str | None:
    """A metric's delta in points (ASCII sign: st.metric colours by it), None when either is unknown."""
    return None if value is None or reference is None else f"{value - reference:+.2f}"


def _chip(text: str, pct: float | None, title: str, chosen: bool = False, auto: bool = False) -> str:
    """One IoU cell as an inline HTML chip: green by IoU, outlined when chosen, ★ for the auto pick."""
    alpha = 0.06 if pct is None else 0.08 + 0.85 * pct / 100
    colour = "#fff" if pct is not None and pct > 55 else "inherit"
    border = "2px solid #d62728" if chosen else "1px solid rgba(128,128,128,.35)"
    return (f'<span title="{html.escape(title)}" style="display:inline-block;min-width:2.5em;text-align:center;'
            f"margin:1px;padding:0 2px;border-radius:4px;font-size:.75em;border:{border};"
            f'background:rgba(31,119,70,{alpha:.2f});color:{colour}">{"★" if auto else ""}{text}</span>')


def _confidence(conf: ClassConfidence | None) -> str:
    """A class's bootstrap verdict as a coloured badge (a coin flip marked ⚠), then the share of
    resamples its choice beats its closest rival and the interval of the IoU gain over it (points)."""
    if conf is None:
        return "—"
    badge = f":{VERDICTS[conf.verdict]}-badge[{'⚠ ' if conf.verdict == 'coin flip' else ''}{conf.verdict}]"
    if conf.rival is None:
        return badge
    return (f"{badge} :small[wins {conf.share:.0%} vs {conf.rival_name}, "
            f"{_pct(conf.low, True, 1)} to {_pct(conf.high, True, 1)}]")


def _heat_row(entry: ClassSummary, candidates: list[str], names: list[str], auto: str) -> str:
    """The candidates' IoU chips of a class; auto: the assignment rule's choice (★)."""
    chips = []
    for k, (variant_id, name) in enumerate(zip(candidates, names), start=1):
        pct = entry.candidate_iou[variant_id]
        tie = " (tied best)" if variant_id in entry.tied else ""
        figures = (f"IoU {_pct(pct)}, precision {_pct(entry.candidate_precision[variant_id])}, "
                   f"recall {_pct(entry.candidate_recall[variant_id])}")
        chips.append(_chip("—" if pct is None else f"{pct:.0f}", pct, f"#{k} {name}: {figures}{tie}",
                           chosen=variant_id == entry.variant, auto=variant_id == auto))
    return "".join(chips)


# --- page ----------------------------------------------------------------------------------

st.title("ISLE ensemble")
st.caption("ISLE (Ostrowski & Shafique, ISVC'23, Sec. 3): for each object class the candidate with the "
           "best per-class IoU is chosen (Algorithm 2), and every image's label map is merged from the "
           "chosen variants' class slices (Algorithm 3). Background is what no chosen class claims.")

dataset, split = pick_dataset_and_split("Nothing to ensemble yet: queue methods on the Home page first.")
directory = cache_dir()

offered = read(assignments.complete_variants, dataset.id, split)
if not offered:
    st.info(f"No variant has label maps for every image of {split} yet: the ensemble needs complete candidates.")
    st.stop()
names = {c.variant.id: c.variant.name for c in offered}
missing = [v.name for v in read(queries.variants, dataset.id) if v.id not in names]

st.subheader("Candidates")
state = st.session_state
if "candidates" not in state:
    state["candidates"] = [c.variant.id for c in offered if c.default] or [offered[0].variant.id]
gone = [c for c in state["candidates"] if c not in names]
state["candidates"] = [c for c in state["candidates"] if c in names]
candidates = st.multiselect("Candidate variants", list(names), format_func=names.get, key="candidates",
                            help="Only variants with a label map for every usable image of the split.")
notes = []
if missing:
    notes.append(f"Not offered (label maps missing on {split}): {', '.join(missing)}.")
if not_default := [c.variant.name for c in offered if not c.default]:
    notes.append(f"Not selected by default (oracles and ensembles): {', '.join(not_default)}.")
if notes:
    st.caption(" ".join(notes))
if gone:
    st.warning(f"{len(gone)} candidate(s) of the restored assignment are no longer complete on {split}: left out.")

left, right = st.columns(2)
with left:
    mode = st.radio("Selection subset", list(SUBSETS), format_func=SUBSETS.get, key="subset_mode")
    fraction, seed = 1.0, 0
    if mode == "fraction":
        state.setdefault("fraction", 0.5)
        fraction = st.slider("Fraction of images that select", 0.05, 0.95, step=0.05, key="fraction")
        state.setdefault("seed", 0)
        seed = int(st.number_input("Seed", min_value=0, step=1, key="seed"))
    exclude = tuple(state.get("exclude", ()))
    if exclude:
        st.caption(f"{len(exclude)} image(s) excluded by the restored assignment.")
    kinds = st.multiselect("Exclude flagged images (Pseudo-label QA) from the selection", list(qa.FLAG_KINDS),
                           format_func=qa.FLAG_KINDS.get, key="exclude_flagged")
    if kinds:
        flagged = read(qa.flagged_ids, dataset.id, tuple(kinds))
        exclude = tuple(sorted({*exclude, *flagged}))
        st.caption(f"{len(flagged)} flagged image(s) kept out of the selection subset.")
with right:
    rule = st.radio("Overlap rule (a pixel two chosen classes both claim)", OVERLAP_RULES,
                    format_func=RULES.get, key="rule")
    assign_name = st.radio("Assignment rule (the choice before overrides)", list(ASSIGN_RULES),
                           format_func=ASSIGN_RULES.get, key="assign_rule")
    margin = 0.0
    if assign_name == "stable":
        state.setdefault("assign_margin", 0.0)
        margin = st.number_input("Margin (IoU points)", min_value=-100.0, max_value=100.0, step=0.5,
                                 format="%.1f", key="assign_margin",
                                 help="A class leaves the best single candidate only when the lower end of "
                                      "the 95% bootstrap interval of its IoU gain over it is above this.")
    assign = AssignRule(assign_name, margin / 100)

if not candidates:
    st.info("Pick at least one candidate variant.")
    st.stop()

overrides = {c: v for c, v in state.get("overrides", {}).items() if v in candidates}
name = state.get("assignment_name", "auto").strip() or "auto"
subset = Subset(fraction, seed, exclude)
try:
    view = read(assignments.plan_view, dataset.id, split, tuple(candidates), subset,
                tuple(sorted(overrides.items())), rule, name, assign)
except (KeyError, ValueError) as exc:
    st.error(str(exc))
    st.stop()
plan, summary, merge_id, naive_id = view.plan, view.summary, view.merge_id, view.naive_id
classes = dataset.classes
# The selection's images with ground truth: the per-class IoU that chooses and predicts is over them.
with_truth = int(max(plan.selection.with_truth, default=0))
if not with_truth:
    st.info(f"No ground truth: {int(max(plan.selection.labelled, default=0)):,} label maps per candidate, 0 images "
            "with masks on the selection subset — the per-class IoU that chooses and predicts needs masks.")
    st.stop()
# Keep only real overrides: a pick equal to the assignment rule's choice follows it from now on.
state["overrides"] = {c: v for c, v in overrides.items() if c in plan.overridden}
report = plan.report is not None
# Off-sample figures of the current choice and rule: the bootstrap and k-fold cross-validation
# over the selection images with ground truth (k-fold needs at least two of them).
folds = min(CV_FOLDS, with_truth)
checked = (read(assignments.validation_view, dataset.id, split, tuple(candidates), subset,
                tuple(sorted(state["overrides"].items())), assign, folds) if folds >= 2 else None)
confidence = {c.class_id: c for c in checked.classes} if checked else {}

st.subheader("Assignment")
st.caption(
    f"Selection subset: {summary.subset.selection_images} image(s)"
    + (f" ({with_truth:,} with ground truth: the figures are over those)"
       if with_truth < summary.subset.selection_images else "")
    + (f"; report subset: {summary.subset.report_images} image(s)" if report else "")
    + ". Chips: every candidate's IoU (%) for the class on the selection subset, in this order: "
    + " · ".join(f"#{k} {n}" for k, n in enumerate(plan.names, start=1))
    + f". ★ = automatic choice ({assign.label()}), red outline = current choice; hover for the name. "
    + ("Confidence: the share of image-level bootstrap resamples "
       f"({checked.resamples:,} over {checked.images:,} images) in which the current choice beats its closest "
       f"rival, and the {checked.level:.0%} interval of its IoU gain over it (points)." if checked else
       "Confidence needs at least two selection images with ground truth.")
)
if restored := state.pop("restored", None):
    st.success(restored)
WIDTHS = [1.3, 3.0, 1.6, 2.1, 2.4, 1.1, 1.3]
header = st.columns(WIDTHS)
for column, title in zip(header, ["Class (images)", "Candidates' IoU", "Automatic choice", "Chosen variant",
                                  "Confidence", "Predicted IoU", "Exact IoU (Δ)"]):
    column.markdown(f"**{title}**")
for entry in summary.classes:
    c = entry.class_id
    row = st.columns(WIDTHS, vertical_alignment="center")
    mark = " :orange-badge[overridden]" if entry.overridden else ""
    row[0].markdown(f"{entry.class_name} ({entry.images}){mark}")
    base = plan.candidates[plan.base[c]]
    row[1].markdown(_heat_row(entry, plan.candidates, plan.names, base), unsafe_allow_html=True)
    if not entry.images:
        row[2].caption("no images in the selection subset (best mIoU)")
    elif base != entry.auto_variant:
        row[2].caption(f"{names[base]} (Algorithm 2: {names[entry.auto_variant]})")
    else:
        tied = f" (tie of {len(entry.tied)})" if entry.tied else ""
        row[2].caption(names[base] + tied)
    state[f"choice_{c}"] = entry.variant
    row[3].selectbox(f"{entry.class_name} variant", plan.candidates, format_func=names.get, key=f"choice_{c}",
                     label_visibility="collapsed", on_change=_override, args=(c,))
    row[4].markdown(_confidence(confidence.get(c)))
    predicted = _pct(entry.predicted_iou.selection)
    if report:
        predicted += f" / {_pct(entry.predicted_iou.report)}"
    row[5].markdown(predicted)
    if entry.exact_iou.selection is None:
        row[6].markdown("—")
    else:
        delta = entry.exact_iou.selection - (entry.predicted_iou.selection or 0.0)
        row[6].markdown(f"{_pct(entry.exact_iou.selection)} ({_pct(delta, signed=True)})")
if report:
    st.caption("Predicted IoU: selection / report subset. Exact IoU: on the selection subset.")

st.subheader("mIoU")
for key, m in (("selection", summary.miou.selection), ("report", summary.miou.report)):
    if m is None:
        continue
    if report:
        st.markdown(f"**{key.capitalize()} subset**")
    best, predicted, exact, naive = st.columns(4)
    best.metric("Best single candidate", _pct(m.best_single), help=names[m.best_single_variant])
    predicted.metric("ISLE predicted", _pct(m.predicted), delta=_delta(m.predicted, m.best_single),
                     help="Delta: versus the best single candidate.")
    exact.metric("ISLE exact", _pct(m.exact), delta=_delta(m.exact, m.predicted),
                 help="After the exact merge ran on every image. Delta: versus the prediction.")
    naive.metric("Naive ISLE", _pct(m.naive), delta=_delta(m.naive, m.best_single),
                 help="The paper's baseline: each image's whole label map from one candidate. "
                      "Delta: versus the best single candidate.")
    st.caption(f"Background IoU: predicted {_pct(m.predicted_background_iou)}, "
               f"exact {_pct(m.exact_background_iou)}.")
    if key == "selection" and checked:
        cv = next(f for f in checked.cv if f.rule == assign.label())  # the current rule's
        in_sample, held_out, rules = st.columns([1, 1, 2])
        in_sample.metric("ISLE gain, in-sample", _pct(checked.in_sample_gain, signed=True),
                         help="ISLE predicted minus the best single candidate, both chosen and scored on "
                              "the same selection images.")
        held_out.metric(f"ISLE gain, cross-validated (k = {cv.k})",
                        f"{_pct(cv.gain, signed=True)} ± {_pct(cv.spread)}",
                        help=f"{cv.rule}: mean ± standard deviation over the folds of the held-out gain.")
        rules.dataframe([{"assignment rule": f.rule, "ISLE": f.isle, "best single": f.single,
                          "gain": f"{_pct(f.gain, signed=True)} ± {_pct(f.spread)}"} for f in checked.cv],
                        hide_index=True, key="cv_table")
        st.caption(f"Cross-validated: the {checked.images:,} selection images with ground truth in {cv.k} "
                   "folds; the rule and the best single candidate choose on k − 1 folds and are scored on the "
                   "held-out one (mIoU %). Overrides are not part of a rule, so they are not cross-validated.")
if report:
    with st.expander("Labelled-budget curve"):
        st.caption(f"Report-subset mIoU when only n selection images are labelled: Algorithm 2, the stable rule "
                   f"(margin {margin:g} points) and the best single candidate chosen on n images drawn from the "
                   f"selection subset ({BUDGET_DRAWS} seeded draws per n), mean ± standard deviation over the draws.")
        if st.button("Compute the curve", key="budget"):
            state["budget_shown"] = True
        if state.get("budget_shown"):
            try:
                curve = read(assignments.budget_view, dataset.id, split, tuple(candidates), subset, margin / 100,
                             BUDGET_DRAWS)
            except ValueError as exc:  # e.g. no report image with ground truth
                st.info(str(exc))
            else:
                st.plotly_chart(budget_chart(curve), key="budget_curve")
st.caption("Predicted from cached counts: an object class's IoU is its chosen variant's IoU, except for "
           "pixels it loses to another class where two chosen slices overlap (only the exact merge counts "
           "those). Background is estimated: the chosen classes' false positives are taken to lie on "
           "background and their misses to become background, exact for images with one object class.")

st.subheader("Save and run")
left, middle = st.columns(2)
with left:
    state.setdefault("assignment_name", "auto")
    state.setdefault("page_opened_at", time.time())
    st.text_input("Assignment name", key="assignment_name")
    note = st.text_input("Note (optional)", key="assignment_note")
    if st.button("Save assignment", key="save_assignment", type="primary"):
        try:
            with connect(directory) as con:
                version_id = assignments.save(con, plan, name, note.strip() or None, current_user())
        except ValueError as exc:
            st.error(str(exc))
        else:
            refresh()
            mine = state.setdefault("my_assignment_saves", [])
            number, others = assignments.saved_meanwhile(read(queries.assignment_history, dataset.id, split, name),
                                                         version_id, state["page_opened_at"], mine)
            mine.append(version_id)
            st.success(f"Saved {name!r} version {number} (id {version_id}).")
            if others:
                st.info(f"Meanwhile another session saved {name!r} as id(s) {', '.join(map(str, others))}; "
                        "every version is kept (Saved versions below).")
with middle:
    st.write(f"The exact merge makes the variant “ISLE ({name})”; naive ISLE uses the automatic choice.")
    run_merge, run_naive = st.columns(2)
    steps = {"run_merge": ("Run exact merge", assignments.merge_step(plan, name)),
             "run_naive": ("Run naive ISLE", assignments.naive_step(plan))}
    for column, (key, (label, step)) in zip((run_merge, run_naive), steps.items()):
        if column.button(label, key=key):
            queue_chain(dataset.root, split, [step], nothing=f"{label.lower()[4:]} is complete on {split}")

st.subheader("Jobs")
jobs_panel()
if has_active_jobs(dataset.id):
    @st.fragment(run_every=2)
    def _watch(rendered: tuple[bool, bool]) -> None:
        """While jobs run: rerun the whole page once the merge or naive ISLE completes on the
        selection subset, so the exact figures appear (the jobs panel shows the progress)."""
        labelled = read(queries.labelled_in_split, dataset.id, split, tuple(plan.selection_ids))
        if tuple(labelled.get(v, 0) >= len(plan.selection_ids) for v in (merge_id, naive_id)) != rendered:
            st.rerun()

    shown = dict(zip(plan.selection.variant_ids, plan.selection.labelled))  # what this run read
    _watch(tuple(bool(shown.get(v, 0) >= len(plan.selection_ids)) for v in (merge_id, naive_id)))

st.subheader("History")
history = read(queries.assignment_history, dataset.id, split, name)
others = [r for r in read(queries.assignment_names, dataset.id, split) if r["name"] != name]
if others:
    st.caption("Other saved names (type one above to see its history): "
               + ", ".join(f"{r['name']} ({r['versions']})" for r in others))
if not history:
    st.caption(f"No saved version of {name!r} yet.")
else:
    decoded = [assignments.decode(r) for r in history]
    st.dataframe(
        [{"version": k, "id": s.id, "saved at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at)),
          "by": s.created_by or "—", "note": s.note, "candidates": len(s.candidates), "assignment rule": s.assign.label(),
          "overlap rule": s.rule,
          "selection": "whole split" if s.subset.fraction >= 1 else f"{s.subset.fraction:g} (seed {s.subset.seed})",
          # The stored automatic choice is Algorithm 2's: for a stable version this lists what the rule moved too.
          "differs from Algorithm 2": ", ".join(classes.name(c) for c, v in sorted(s.choice.items())
                                                if s.auto.get(c) != v) or "—"}
         for k, s in enumerate(decoded, start=1)],
        hide_index=True,
    )
    by_id = {r["id"]: r for r in history}
    st.selectbox("Version", list(reversed(by_id)), key="restore_version",
                           format_func=lambda i: f"version {list(by_id).index(i) + 1} (id {i})")
    st.button("Restore", key="restore", on_click=_restore, args=(by_id,))
    latest = decoded[-1]
    if (latest.candidates, latest.rule, latest.assign, latest.choice, (latest.subset.fraction, latest.subset.seed)) != (
            plan.candidates, plan.rule, plan.assign, {int(c): v for c, v in plan.choice_dict().items()},
            (fraction, seed)):
        st.caption("The editor differs from the latest saved version: save to keep the changes.")

st.subheader("Conflicts")
if summary.miou.selection.exact is None:
    st.caption("Run the exact merge to count the pixels two chosen classes both claim.")
elif not summary.conflicts:
    st.caption("No overlap: no pixel was claimed by two chosen classes.")
else:
    st.caption("Pixels of the selection subset the winner took from the loser (rule: "
               f"{rule}); “(absent from labels)”: dropped because the image does not hold the class.")
    st.dataframe([dataclasses.asdict(c) for c in summary.conflicts[:CONFLICT_ROWS]], hide_index=True)

st.subheader("Export")
st.caption(f"Writes the exact merge of the latest saved version of {name!r} as a VOCdevkit folder "
           "(SegmentationClassAug, ImageSets, JPEGImages) with provenance.json.")
default_dest = directory / "exports" / name
dest = st.text_input("Destination folder", key="export_dest", placeholder=str(default_dest))
images = st.radio("Images", IMAGE_MODES, format_func=IMAGES.get, horizontal=True, key="export_images")
if st.button("Export", key="export"):
    if not history:
        st.error(f"Save the assignment {name!r} first: the export is of a saved version.")
    else:
        try:
            target = data_roots().check_write(dest.strip() or default_dest, "export destination")
            exported = export_assignment(directory, dataset.id, split, assignments.decode(history[-1]), target, images)
        except (ExportError, PathRefused) as exc:
            st.error(str(exc))
        else:
            st.success(f"Exported {exported.images} image(s) to {exported.dest}.")
            if exported.missing:
                st.warning(f"{len(exported.missing)} image(s) without a label map were left out.")
