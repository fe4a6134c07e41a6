"""ISLE assignments over the cache: candidates, Algorithm 2 with user overrides, the predicted
figures, saved versions, and the chain steps of the exact and naive merges.

The numerics are ``numerics``; this module reads the per-class counts of the candidates
over the selection and report subsets (one SQL aggregation each, no label map decoded) and turns
an assignment into what the page and the command line show and queue.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from cache import queries, reports
from cache.diagnostics import metric_values
from cache.reports import IoUTable
from cache.classes import ClassSet
from cache.rows import Variant
from engine.core import registry
from engine.core.chains import Step, chain_variants
from engine.core.registry import Role

from . import validation
from .numerics import (
    OVERLAP_RULES,
    AutoAssignment,
    Subset,
    absent_index,
    auto_assignment,
    iou_of,
    precision_priority,
    predicted_counts,
)

MERGE, NAIVE = "isle", "isle-naive"  # the ensemble plugins of engine/isle/merge.py
ASSIGN_RULES = ("algorithm2", "stable")
T = TypeVar("T")


@dataclass(frozen=True)
class AssignRule:
    """How the automatic choice is made before any override.

    name: "algorithm2" (ISLE Algorithm 2: each class's best candidate on the selection images) or
    "stable" (``validation.stable_choice``: a class leaves the best single candidate only when
    the lower end of its bootstrap interval for the IoU gain is above ``margin``, IoU units).
    resamples, level, seed: the stable rule's bootstrap (B, interval coverage, RNG seed).
    Raises ``ValueError`` for an unknown name or bad bootstrap settings.
    """

    name: str = "algorithm2"
    margin: float = 0.0
    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ASSIGN_RULES:
            raise ValueError(f"assignment rule must be one of {ASSIGN_RULES}, got {self.name!r}")
        if self.resamples < 1 or not 0.0 < self.level < 1.0:
            raise ValueError(f"bootstrap needs resamples >= 1 and a level in (0, 1), got {self.resamples}, {self.level}")

    def label(self) -> str:
        """"Algorithm 2" or "stable (margin +0.0 pt)" (IoU points), for pages and the command line."""
        return "Algorithm 2" if self.name == "algorithm2" else f"stable (margin {100 * self.margin:+.1f} pt)"

    def rule(self, variant_ids: Sequence[str], classes: ClassSet) -> validation.Rule:
        """The rule as a function of per-image counts (``validation.Rule``)."""
        if self.name == "algorithm2":
            return validation.algorithm2(variant_ids, classes)
        return validation.stable(variant_ids, classes, self.margin, self.resamples, self.level, self.seed)


@dataclass(frozen=True)
class Complete:
    """A variant with a label map for every usable image of a split. default: a default ISLE
    candidate, i.e. no step of its chain reads the ground truth (oracle) and it is no ensemble."""

    variant: Variant
    default: bool


def is_default_candidate(variant: Variant) -> bool:
    """No step of the chain is an oracle and the chain does not start with an ensemble (by role)."""
    roles = [registry.get(s["name"]).role for s in variant.steps]
    return Role.ORACLE not in roles and roles[0] is not Role.ENSEMBLE


def complete_variants(con: queries.Con, dataset_id: str, split: str) -> list[Complete]:
    """Variants with a label map for every usable image of the split, in ``queries.variants`` order."""
    usable = len(queries.usable_image_ids(con, dataset_id, split))
    labelled = queries.labelled_in_split(con, dataset_id, split)
    return [Complete(v, is_default_candidate(v)) for v in queries.variants(con, dataset_id)
            if usable and labelled.get(v.id, 0) >= usable]


def _rows(table: IoUTable, variant_ids: Sequence[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(table.variant_ids)}
    missing = [v for v in variant_ids if v not in index]
    if missing:
        raise KeyError(f"variant(s) {missing} have no label map on these images")
    return np.array([index[v] for v in variant_ids], np.int64)


@dataclass(frozen=True)
class Figures:
    """Per-class IoU of one label set over one subset: ``iou (C,)`` in [0, 1] (NaN: no image),
    ``miou``, and ``counts (C, 3)`` TP, FP, FN."""

    counts: np.ndarray
    iou: np.ndarray
    miou: float


def _figures(counts: np.ndarray, has_images: np.ndarray) -> Figures:
    iou, miou = iou_of(counts, has_images)
    return Figures(counts=counts, iou=iou, miou=miou)


def table_figures(table: IoUTable, variant_id: str) -> Figures | None:
    """A variant's figures from an ``IoUTable`` row, None when it is not in the table."""
    if variant_id not in table.variant_ids:
        return None
    row = table.variant_ids.index(variant_id)
    counts = np.stack([table.tp[row], table.fp[row], table.fn[row]], axis=1)
    return _figures(counts, table.n_images[row] > 0)


@dataclass(frozen=True)
class Plan:
    """One ISLE assignment with everything shown about it.

    candidates / names: the V candidate variant ids and names. selection / report: their
    ``IoUTable`` over the selection and report image subsets (report None when every image
    selects). auto: Algorithm 2 on the selection subset. choice: ``(C,)`` candidate row per class
    after the overrides (-1 for the background). assign: the rule that made ``base``, the choice
    before overrides (Algorithm 2's ``auto.choice``, or the stable rule's). overridden: class ids
    whose choice differs from ``base``.
    priority: class ids by the chosen variants' precision (overlap rule "precision" and ties).
    predicted: the ensemble's predicted figures per subset ("selection", "report").
    """

    dataset_id: str
    split: str
    candidates: list[str]
    names: list[str]
    subset: Subset
    rule: str
    selection_ids: list[str]
    report_ids: list[str]
    selection: IoUTable
    report: IoUTable | None
    auto: AutoAssignment
    assign: AssignRule
    base: np.ndarray
    choice: np.ndarray
    overridden: tuple[int, ...]
    priority: tuple[int, ...]
    predicted: dict[str, Figures]

    @property
    def classes(self) -> ClassSet:
        """The dataset's class set."""
        return self.selection.classes

    def chosen(self, class_id: int) -> str:
        """The variant id chosen for an object class."""
        return self.candidates[self.choice[class_id]]

    def best_single(self, subset: str = "selection") -> int:
        """The candidate row with the best mIoU on ``subset``."""
        table = self.selection if subset == "selection" else self.report
        miou = table.miou[_rows(table, self.candidates)]
        return int(np.nanargmax(np.nan_to_num(miou, nan=-1.0)))

    def choice_dict(self, choice: np.ndarray | None = None) -> dict[str, str]:
        """``{"<class id>": variant id}`` of ``choice`` (default: the current one), for JSON."""
        choice = self.choice if choice is None else choice
        return {str(c): self.candidates[choice[c]] for c in self.classes.foreground}


def build_plan(con: queries.Con, dataset_id: str, split: str, candidates: Sequence[str],
               subset: Subset = Subset(), overrides: Mapping[int, str] | None = None,
               rule: str = "score", assign: AssignRule = AssignRule()) -> Plan:
    """Algorithm 2 (or the ``assign`` rule) over ``candidates`` on the selection subset, then
    ``overrides`` ``{class id: variant id}``, and the predicted figures. rule: the overlap rule of
    the merge. Raises ``ValueError`` for no candidate, an unknown rule, or an override naming a
    non-candidate; ``KeyError`` for a candidate without label maps on the subset."""
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise ValueError("ISLE needs at least one candidate variant")
    if rule not in OVERLAP_RULES:
        raise ValueError(f"overlap rule must be one of {OVERLAP_RULES}, got {rule!r}")
    image_ids = queries.usable_image_ids(con, dataset_id, split)
    selection_ids, report_ids = subset.split(image_ids)
    if not selection_ids:
        raise ValueError(f"the selection subset of {split} is empty (fraction {subset.fraction}, seed {subset.seed})")
    # Every usable image selects: the split's count totals give the same table as its rows.
    whole = len(selection_ids) == len(image_ids)
    selection = reports.iou_table(con, dataset_id, split, None if whole else selection_ids)
    report = reports.iou_table(con, dataset_id, split, report_ids) if report_ids else None
    rows = _rows(selection, candidates)
    classes = selection.classes
    auto = auto_assignment(selection.iou[rows], selection.miou[rows], candidates, classes)
    base = auto.choice.copy()
    if assign.name != "algorithm2":
        counts = reports.image_counts(con, dataset_id, split, candidates, selection_ids).counts
        base = assign.rule(candidates, classes)(counts)
    choice = base.copy()
    for class_id, variant_id in (overrides or {}).items():
        if variant_id not in candidates:
            raise ValueError(f"override for {classes.name(int(class_id))}: {variant_id!r} is not a candidate")
        if int(class_id) not in classes.foreground:
            raise ValueError(f"override for {classes.name(int(class_id))}: only object classes are assigned")
        choice[int(class_id)] = candidates.index(variant_id)
    priority = precision_priority(selection.tp[rows], selection.fp[rows], choice, classes)
    predicted = {}
    for name, table in (("selection", selection), ("report", report)):
        if table is not None:
            r = _rows(table, candidates)
            counts = predicted_counts(table.tp[r], table.fp[r], table.fn[r], choice, classes)
            predicted[name] = _figures(counts, table.n_images[r].max(axis=0) > 0)
    names = [selection.names[r] for r in rows]
    return Plan(dataset_id=dataset_id, split=split, candidates=candidates, names=names, subset=subset,
                rule=rule, selection_ids=selection_ids, report_ids=report_ids, selection=selection,
                report=report, auto=auto, assign=assign, base=base, choice=choice,
                overridden=tuple(int(c) for c in classes.foreground if choice[c] != base[c]),
                priority=priority, predicted=predicted)


def merge_step(plan: Plan, name: str = "auto") -> Step:
    """The chain step of the exact merge (``engine/isle/merge.py``) of ``plan``'s assignment;
    its variant is named "ISLE (<name>)" (the name labels it; the assignment identifies it)."""
    params = {"variants": [plan.chosen(c) for c in plan.classes.foreground], "rule": plan.rule,
              "priority": list(plan.priority)}
    return Step(MERGE, params, title=f"ISLE ({name})")


def naive_step(plan: Plan) -> Step:
    """The chain step of naive ISLE with ``plan``'s automatic choice: classes ranked by how many
    selection images hold them, fallback the best single candidate."""
    rows = _rows(plan.selection, plan.candidates)
    images = plan.selection.n_images[rows].max(axis=0)
    ranking = sorted(plan.classes.foreground, key=lambda c: (-images[c], c))
    params = {"variants": [plan.candidates[plan.auto.choice[c]] for c in plan.classes.foreground],
              "ranking": ranking, "fallback": plan.candidates[plan.best_single()]}
    return Step(NAIVE, params, title="naive ISLE")


def step_variant_id(dataset_id: str, step: Step) -> str:
    """The id of the variant a merge step makes (its label maps exist once its job is done)."""
    return chain_variants(dataset_id, [step])[0].id


def save(con: queries.Con, plan: Plan, name: str, note: str | None = None, created_by: str | None = None) -> int:
    """Store ``plan``'s assignment as a new version of ``name``; returns the version's id.
    ``created_by``: the signed-in user (team mode), else None."""
    if not name.strip():
        raise ValueError("an assignment needs a name")
    return queries.save_assignment(con, {
        "dataset_id": plan.dataset_id, "split": plan.split, "name": name.strip(),
        "candidates": json.dumps(plan.candidates), "selection": json.dumps(asdict(plan.subset)),
        "rule": plan.rule, "choice": json.dumps(plan.choice_dict()),
        "auto": json.dumps(plan.choice_dict(plan.auto.choice)), "note": note,
        "assign": json.dumps(asdict(plan.assign)), "created_by": created_by,
    })


def saved_meanwhile(history: Sequence[dict[str, Any]], version_id: int, since: float,
                    mine: Collection[int]) -> tuple[int, list[int]]:
    """``(version number, ids saved meanwhile)`` of the just saved ``version_id`` among a name's
    ``history`` (``queries.assignment_history`` rows, oldest first): its 1-based position, and the
    earlier versions created at or after ``since`` (e.g. when a page session opened) that are not
    in ``mine`` (that session's own saves), i.e. saved by someone else in between. Versions are
    only ever added, so both are kept; this says so instead of letting one look overwritten.
    Raises ``KeyError`` when ``version_id`` is not in ``history``."""
    ids = [row["id"] for row in history]
    if version_id not in ids:
        raise KeyError(f"assignment version {version_id} is not in this history")
    others = [row["id"] for row in history
              if row["id"] < version_id and row["created_at"] >= since and row["id"] not in mine]
    return ids.index(version_id) + 1, others


@dataclass(frozen=True)
class Saved:
    """A stored assignment version, decoded: what ``build_plan`` needs to rebuild it."""

    id: int
    name: str
    candidates: list[str]
    subset: Subset
    rule: str
    choice: dict[int, str]
    auto: dict[int, str]
    note: str | None
    created_at: float
    assign: AssignRule = AssignRule()
    created_by: str | None = None  # the signed-in user who saved it (team mode)


def decode(row: Mapping[str, Any]) -> Saved:
    """An ``assignments`` row as ``Saved``."""
    selection = json.loads(row["selection"])
    return Saved(id=row["id"], name=row["name"], candidates=json.loads(row["candidates"]),
                 subset=Subset(fraction=selection["fraction"], seed=selection["seed"],
                               exclude=tuple(selection["exclude"])),
                 rule=row["rule"], choice={int(c): v for c, v in json.loads(row["choice"]).items()},
                 auto={int(c): v for c, v in json.loads(row["auto"]).items()}, note=row["note"],
                 created_at=row["created_at"],
                 assign=AssignRule(**json.loads(row["assign"])) if row.get("assign") else AssignRule(),
                 created_by=row.get("created_by"))


def rebuild(con: queries.Con, dataset_id: str, split: str, saved: Saved) -> Plan:
    """The plan of a saved version: its candidates, subset and rule, its choice as overrides of
    today's Algorithm 2 (so the stored choice is restored exactly even if counts changed)."""
    return build_plan(con, dataset_id, split, saved.candidates, saved.subset, saved.choice, saved.rule, saved.assign)


def lost_pixels(conflicts: Sequence[Mapping[str, Any]], classes: ClassSet) -> np.ndarray:
    """``(C,) int64`` pixels each class lost, from ``queries.conflict_totals`` rows (winner
    ``numerics.absent_index`` = dropped as absent from the image's labels)."""
    lost = np.zeros(classes.num_classes, np.int64)
    for r in conflicts:
        lost[r["loser"]] += r["pixels"]
    return lost


def percent(value: float | None) -> float | None:
    """A fraction in [0, 1] as a percentage rounded to 2 places; None for None or NaN (no image)."""
    return None if value is None or value != value else round(100 * float(value), 2)


@dataclass(frozen=True)
class BySubset(Generic[T]):
    """One figure on the selection subset and on the report subset (None when every image selects)."""

    selection: T
    report: T | None = None


@dataclass(frozen=True)
class ClassSummary:
    """One object class of an assignment. IoU in percent, None where no image holds the class
    (or, for ``exact_iou``, until the merge has run on every image of the subset).

    candidate_iou: ``{variant id: IoU}`` of every candidate on the selection subset, and its
    precision and recall (``candidate_precision``, ``candidate_recall``; None where undefined). lost_pixels:
    pixels the class lost in overlaps on the selection subset, of which ``tp_lost`` on its ground
    truth and ``fp_lost`` elsewhere (None until the merge ran; the rest lie on ground-truth 255).
    """

    class_id: int
    class_name: str
    images: int
    variant: str
    variant_name: str
    auto_variant: str
    overridden: bool
    tied: tuple[str, ...]
    candidate_iou: dict[str, float | None]
    candidate_precision: dict[str, float | None]
    candidate_recall: dict[str, float | None]
    lost_pixels: int
    tp_lost: int | None
    fp_lost: int | None
    predicted_iou: BySubset[float | None]
    exact_iou: BySubset[float | None]


@dataclass(frozen=True)
class MIoUSummary:
    """mIoU (%) on one subset: the best single candidate, ISLE predicted and exact, naive ISLE,
    and the background IoU (predicted is an estimate, see ``numerics.predicted_counts``)."""

    best_single: float | None
    best_single_variant: str
    predicted: float | None
    exact: float | None
    naive: float | None
    predicted_background_iou: float | None
    exact_background_iou: float | None


@dataclass(frozen=True)
class SubsetSummary:
    fraction: float
    seed: int
    exclude: tuple[str, ...]
    selection_images: int
    report_images: int


@dataclass(frozen=True)
class CandidateSummary:
    id: str
    name: str
    miou_selection: float | None


@dataclass(frozen=True)
class ConflictSummary:
    """Pixels of the selection subset ``winner`` took from ``loser`` (class names; winner
    "(absent from labels)": dropped because the image does not hold the class)."""

    winner: str
    loser: str
    pixels: int
    images: int


@dataclass(frozen=True)
class Summary:
    """Everything known about an assignment; ``dataclasses.asdict`` of it is the export's
    ``provenance.json`` details."""

    dataset_id: str
    split: str
    rule: str
    subset: SubsetSummary
    candidates: tuple[CandidateSummary, ...]
    priority: tuple[int, ...]
    merge_variant: str | None
    naive_variant: str | None
    classes: tuple[ClassSummary, ...]
    miou: BySubset[MIoUSummary]
    conflicts: tuple[ConflictSummary, ...]


def summary(con: queries.Con, plan: Plan, merge_variant_id: str | None = None,
            naive_variant_id: str | None = None) -> Summary:
    """Everything known about ``plan`` (IoU in percent): the candidates, the assignment per class
    with predicted and (when the merge ran on every image) exact IoU on each subset, the
    conflicts per class pair, and the mIoU of the best single candidate, the predicted and exact
    ensemble and naive ISLE. It is the export's provenance and what the command line prints."""
    subsets = {"selection": (plan.selection, plan.selection_ids)}
    if plan.report is not None:
        subsets["report"] = (plan.report, plan.report_ids)
    exact: dict[str, Figures | None] = {}
    naive: dict[str, Figures | None] = {}
    for key, (table, ids) in subsets.items():
        complete = dict(zip(table.variant_ids, table.labelled))
        exact[key] = (table_figures(table, merge_variant_id)
                      if merge_variant_id and complete.get(merge_variant_id, 0) >= len(ids) else None)
        naive[key] = (table_figures(table, naive_variant_id)
                      if naive_variant_id and complete.get(naive_variant_id, 0) >= len(ids) else None)

    def by_subset(value) -> BySubset:
        return BySubset(*(value(key) for key in subsets))

    conflicts = queries.conflict_totals(con, merge_variant_id, plan.selection_ids) if merge_variant_id else []
    class_set = plan.classes
    lost = lost_pixels(conflicts, class_set)
    sel_rows = _rows(plan.selection, plan.candidates)
    precision = metric_values(plan.selection.tp, plan.selection.fp, plan.selection.fn, "precision")
    recall = metric_values(plan.selection.tp, plan.selection.fp, plan.selection.fn, "recall")
    classes = []
    for c in class_set.foreground:
        tp_lost = fp_lost = None
        if exact["selection"] is not None:
            # What the overlaps took: predicted minus exact TP and FP, at most lost_pixels (the
            # rest of the lost pixels lie on ground-truth 255, which no count includes).
            delta = plan.predicted["selection"].counts[c] - exact["selection"].counts[c]
            tp_lost, fp_lost = int(delta[0]), int(delta[1])
        classes.append(ClassSummary(
            class_id=c, class_name=class_set.name(c), images=int(plan.selection.n_images[sel_rows, c].max()),
            variant=plan.chosen(c), variant_name=plan.names[plan.choice[c]],
            auto_variant=plan.candidates[plan.auto.choice[c]], overridden=c in plan.overridden,
            tied=tuple(plan.candidates[r] for r in plan.auto.tied.get(c, ())),
            candidate_iou={v: percent(plan.selection.iou[r, c]) for v, r in zip(plan.candidates, sel_rows)},
            candidate_precision={v: percent(precision[r, c]) for v, r in zip(plan.candidates, sel_rows)},
            candidate_recall={v: percent(recall[r, c]) for v, r in zip(plan.candidates, sel_rows)},
            lost_pixels=int(lost[c]), tp_lost=tp_lost, fp_lost=fp_lost,
            predicted_iou=by_subset(lambda key: percent(plan.predicted[key].iou[c])),
            exact_iou=by_subset(lambda key: percent(exact[key].iou[c]) if exact[key] else None)))
    best = plan.best_single()

    def miou(key: str) -> MIoUSummary:
        table = subsets[key][0]
        rows = _rows(table, plan.candidates)
        return MIoUSummary(
            best_single=percent(table.miou[rows][best]), best_single_variant=plan.candidates[best],
            predicted=percent(plan.predicted[key].miou), exact=percent(exact[key].miou) if exact[key] else None,
            naive=percent(naive[key].miou) if naive[key] else None,
            predicted_background_iou=percent(plan.predicted[key].iou[0]) if class_set.has_background else None,
            exact_background_iou=percent(exact[key].iou[0]) if exact[key] and class_set.has_background else None)

    return Summary(
        dataset_id=plan.dataset_id, split=plan.split, rule=plan.rule,
        subset=SubsetSummary(plan.subset.fraction, plan.subset.seed, tuple(plan.subset.exclude),
                             len(plan.selection_ids), len(plan.report_ids)),
        candidates=tuple(CandidateSummary(v, n, percent(plan.selection.miou[r]))
                         for v, n, r in zip(plan.candidates, plan.names, sel_rows)),
        priority=tuple(plan.priority), merge_variant=merge_variant_id, naive_variant=naive_variant_id,
        classes=tuple(classes), miou=by_subset(miou),
        conflicts=tuple(ConflictSummary("(absent from labels)" if r["winner"] == absent_index(class_set)
                                        else class_set.name(r["winner"]),
                                        class_set.name(r["loser"]), int(r["pixels"]), int(r["n_images"]))
                        for r in conflicts))


@dataclass(frozen=True)
class PlanView:
    """What the ISLE page shows for one editor state: the plan, its summary, and the ids of the
    variants its exact merge and naive ISLE make (their figures appear once they ran)."""

    plan: Plan
    summary: Summary
    merge_id: str
    naive_id: str


def plan_view(con: queries.Con, dataset_id: str, split: str, candidates: tuple[str, ...], subset: Subset,
              overrides: tuple[tuple[int, str], ...], rule: str, name: str,
              assign: AssignRule = AssignRule()) -> PlanView:
    """``build_plan`` with ``overrides`` as ``((class id, variant id), ...)``, and its summary with
    the merge named ``name``; the arguments are hashable so the page can cache the result."""
    plan = build_plan(con, dataset_id, split, candidates, subset, dict(overrides), rule, assign)
    merge_id = step_variant_id(dataset_id, merge_step(plan, name))
    naive_id = step_variant_id(dataset_id, naive_step(plan))
    return PlanView(plan, summary(con, plan, merge_id, naive_id), merge_id, naive_id)


# --- off-sample figures: cross-validation, per-class confidence, the budget curve -------------


@dataclass(frozen=True)
class ClassConfidence:
    """How sure the choice of one object class is, from the image-level bootstrap.

    rival: the candidate the chosen one beats least often (None: nothing competes or no resample
    holds the class); share: the share of resamples in which the chosen one has the higher IoU,
    in [0, 1]; low, high: the interval of its IoU gain over the rival, in IoU points (percent);
    verdict: "sure" (share >= 0.95), "likely" (>= 0.75), "coin flip", "tied" (equal IoU in
    every resample), "only candidate" or "no images".
    """

    class_id: int
    class_name: str
    variant: str
    rival: str | None
    rival_name: str | None
    share: float | None
    low: float | None
    high: float | None
    verdict: str


@dataclass(frozen=True)
class CVFigure:
    """k-fold cross-validation of an assignment rule: the mean held-out mIoU (%) of the rule's
    ensemble and of the best single candidate chosen on the same folds, the gain's mean and its
    spread (standard deviation over the folds), and each fold's gain."""

    rule: str
    k: int
    isle: float
    single: float
    gain: float
    spread: float
    gains: tuple[float, ...]


@dataclass(frozen=True)
class Validation:
    """What survives off-sample, shown beside the in-sample figures.

    images: selection images with ground truth (what is resampled and folded); classes: one
    ``ClassConfidence`` per object class of the plan's current choice; cv: Algorithm 2 and the
    stable rule (the plan's margin, else 0), in that order; in_sample_gain: predicted ISLE minus
    the best single candidate on the selection images (%).
    """

    images: int
    resamples: int
    level: float
    seed: int
    classes: tuple[ClassConfidence, ...]
    cv: tuple[CVFigure, ...]
    in_sample_gain: float | None


def _cv_figure(label: str, cv: validation.CrossValidation) -> CVFigure:
    return CVFigure(rule=label, k=cv.k, isle=percent(cv.isle.mean()), single=percent(cv.single.mean()),
                    gain=percent(cv.gain.mean()), spread=percent(cv.gain.std()),
                    gains=tuple(percent(g) for g in cv.gain))


def validate(con: queries.Con, plan: Plan, k: int = 5, seed: int = 0, resamples: int = 1000,
             level: float = 0.95) -> Validation:
    """The bootstrap of ``plan``'s choice and the k-fold cross-validation of Algorithm 2 and of
    the stable rule, over the plan's selection images with ground truth (one read of their
    per-image counts). Raises ``ValueError`` when k exceeds those images."""
    data = reports.image_counts(con, plan.dataset_id, plan.split, plan.candidates, plan.selection_ids)
    counts, classes, ids = data.counts, plan.classes, plan.candidates
    if not len(counts):
        raise ValueError(f"no selection image of {plan.split} has ground truth")
    iou = validation.resampled_iou(counts, validation.bootstrap_weights(len(counts), resamples, seed))
    conf = validation.confidence(iou, plan.choice, classes, level)
    rows = []
    for c in classes.foreground:
        rival = conf.rival(c)
        rows.append(ClassConfidence(
            class_id=c, class_name=classes.name(c), variant=plan.chosen(c),
            rival=None if rival is None else ids[rival], rival_name=None if rival is None else plan.names[rival],
            share=None if rival is None else round(float(conf.share[c, rival]), 3),
            low=None if rival is None else percent(conf.low[c, rival]),
            high=None if rival is None else percent(conf.high[c, rival]), verdict=conf.verdict(c)))
    stable = plan.assign if plan.assign.name == "stable" else AssignRule("stable", resamples=resamples,
                                                                          level=level, seed=seed)
    fold = validation.folds(data.image_ids, k, seed)
    cv = tuple(_cv_figure(rule.label(), validation.cross_validate(counts, fold, rule.rule(ids, classes), ids, classes))
               for rule in (AssignRule(), stable))
    best = plan.selection.miou[_rows(plan.selection, ids)][plan.best_single()]
    gain = percent(plan.predicted["selection"].miou - best)
    return Validation(images=len(counts), resamples=resamples, level=level, seed=seed, classes=tuple(rows),
                      cv=cv, in_sample_gain=gain)


@dataclass(frozen=True)
class BudgetRow:
    """One size of the labelled-budget curve: n selection images drawn, and per rule ("Algorithm
    2", the stable rule's label, "best single") the mean and standard deviation over the draws of
    the report-subset mIoU (%)."""

    n: int
    mean: dict[str, float]
    spread: dict[str, float]


def budget_curve(con: queries.Con, plan: Plan, sizes: Sequence[int | None] = validation.BUDGET_SIZES,
                 draws: int = 20, seed: int = 0, margin: float = 0.0,
                 resamples: int = 1000) -> tuple[BudgetRow, ...]:
    """Algorithm 2, the stable rule (``margin``) and the best single candidate chosen on n images
    drawn from ``plan``'s selection images, scored on its report subset (held fixed), for each n
    of ``sizes`` over ``draws`` seeded draws. Raises ``ValueError`` when the plan has no report
    subset (a selection fraction of 1)."""
    if not plan.report_ids:
        raise ValueError("the budget curve needs a report subset: choose a selection fraction below 1")
    ids, classes = plan.candidates, plan.classes
    pool = reports.image_counts(con, plan.dataset_id, plan.split, ids, plan.selection_ids).counts
    report = reports.image_counts(con, plan.dataset_id, plan.split, ids, plan.report_ids).counts
    stable = AssignRule("stable", margin=margin, resamples=resamples, seed=seed)
    rules = {"Algorithm 2": AssignRule().rule(ids, classes), stable.label(): stable.rule(ids, classes)}
    curve = validation.budget_curve(pool, report, rules, ids, classes, sizes, draws, seed)
    return tuple(BudgetRow(n=int(n), mean={r: percent(v[s].mean()) for r, v in curve.miou.items()},
                           spread={r: percent(v[s].std()) for r, v in curve.miou.items()})
                 for s, n in enumerate(curve.sizes))


def validation_view(con: queries.Con, dataset_id: str, split: str, candidates: tuple[str, ...], subset: Subset,
                    overrides: tuple[tuple[int, str], ...], assign: AssignRule = AssignRule(),
                    k: int = 5) -> Validation:
    """``validate`` of the plan ``plan_view`` builds from the same (hashable) arguments."""
    return validate(con, build_plan(con, dataset_id, split, candidates, subset, dict(overrides), assign=assign), k)


def budget_view(con: queries.Con, dataset_id: str, split: str, candidates: tuple[str, ...], subset: Subset,
                margin: float = 0.0, draws: int = 20) -> tuple[BudgetRow, ...]:
    """``budget_curve`` of Algorithm 2's plan over ``subset`` (which needs a report subset)."""
    return budget_curve(con, build_plan(con, dataset_id, split, candidates, subset), draws=draws, margin=margin)
