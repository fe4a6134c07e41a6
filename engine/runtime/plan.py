"""The whole comparison as one plan: every standard chain on a split, with estimated times.

``standard_runs()`` is every registered method the app queues without user input (role
``METHOD``, offer ``QUEUE``: no import, oracle or ensemble) and the refinement chains of the
README's results table. ``make_plan`` says, for a dataset split, which of them are complete
already and how long each remaining one should take on this machine: the median measured
seconds per unit of each of its plugin's stages on this device (``cache.queries.stage_cost_rates``,
recorded by the worker) times the stage's units (the split's images; training stages: steps from
the plugin's config). ``submit_plan`` queues the remaining chains (``jobs.submit_chain``).

The ISLE ensemble is not part of the plan: it chooses among the variants complete on the split,
so it runs after them (``python -m engine isle --name auto --naive``, or the ISLE page).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import queries
from cache.db import connect, db_path
from engine.core import registry
from engine.core.chains import Step, chain_variants, dataset_id_for
from engine.core.dataset import open_layout
from engine.core.layouts import read_split_ids
from engine.core.registry import Offer, Role
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import torch_device

# The chains of the README's results table after the methods themselves, each after its prefix
# (the variant it refines is an earlier run of the plan).
PER_CLASS_WALK = Step("random-walk", {"normalise": "per_class", "sem_seg_bg_thres": 0.45})
STANDARD_CHAINS: tuple[tuple[Step, ...], ...] = (
    (Step("cam"), Step("dcrf")),
    (Step("cam"), Step("svm")),
    (Step("cam"), Step("random-walk")),
    (Step("cam"), Step("random-walk"), Step("dcrf")),
    (Step("cam"), PER_CLASS_WALK),
    (Step("cam"), PER_CLASS_WALK, Step("dcrf")),
    (Step("tkp-pcl"), Step("dcrf")),
)
ISLE_AFTER = "python -m engine isle --name auto --naive"  # what makes the ensemble once the plan is done
LABEL_STAGE = "label"  # the worker's own stage of a label job: one unit per image


def standard_runs() -> tuple[tuple[Step, ...], ...]:
    """Every chain of the whole comparison, each after the chains that are its prefixes: one
    single-step chain per queueable method in registration order, then ``STANDARD_CHAINS``."""
    methods = tuple((Step(p.name),) for p in registry.plugins(Role.METHOD, offer=Offer.QUEUE))
    return methods + tuple(chain for chain in STANDARD_CHAINS if chain not in methods)


@dataclass(frozen=True)
class PlannedRun:
    """One chain of the plan. ``estimate_seconds`` is the time of its last step only (its prefixes
    are earlier runs of the plan): None when that plugin's labelling was never measured on this
    device, 0.0 when ``done``. ``images``: the split's usable images (its list's ids before a scan)."""

    steps: tuple[Step, ...]
    label: str
    variant_id: str
    images: int
    estimate_seconds: float | None
    done: bool


@dataclass(frozen=True)
class Plan:
    """The standard runs on one dataset split, measured on ``device`` ("cpu" or "cuda")."""

    split: str
    device: str
    runs: tuple[PlannedRun, ...]

    @property
    def todo(self) -> tuple[PlannedRun, ...]:
        """The runs not complete yet, in plan order."""
        return tuple(r for r in self.runs if not r.done)

    @property
    def total_seconds(self) -> float:
        """The sum of the known estimates of ``todo``, seconds."""
        return sum(r.estimate_seconds or 0.0 for r in self.todo)

    @property
    def unmeasured(self) -> int:
        """How many runs of ``todo`` have no estimate."""
        return sum(r.estimate_seconds is None for r in self.todo)

    def total_text(self) -> str:
        """The total as a sentence, e.g. "about 1 h 05 min, plus 2 runs not measured yet"."""
        if not self.todo:
            return "nothing to do: every run is complete"
        measured = len(self.todo) - self.unmeasured
        text = f"about {duration(self.total_seconds)}" if measured else "no run measured yet"
        return text + (f", plus {self.unmeasured} run(s) not measured yet" if measured and self.unmeasured else "")

    def rows(self) -> list[dict[str, Any]]:
        """One display row per run: chain, images, estimate (text), plan (to run or skipped)."""
        return [{"chain": r.label, "images": r.images,
                 "estimate": "-" if r.done else estimate_text(r.estimate_seconds),
                 "plan": "complete, skipped" if r.done else "to run"} for r in self.runs]


def duration(seconds: float) -> str:
    """``seconds`` as "42 s", "7 min 05 s" or "1 h 05 min"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def estimate_text(seconds: float | None) -> str:
    """An estimate for display: "not measured yet" when None."""
    return "not measured yet" if seconds is None else duration(seconds)


# Training stages count steps: epochs (of the config field named) times the split's batches.
STEP_STAGES = {"train": ("epochs",), "warm-up": ("warmup_epochs",), "self-training": ("epochs", "-warmup_epochs")}


def stage_units(stage: str, cfg: Any, images: int) -> int:
    """The units a full run of ``stage`` does on ``images`` images with config ``cfg``: training
    steps for a ``STEP_STAGES`` stage (epochs × max(1, images // batch_size), the last partial
    batch dropped as the plugins do), else one unit per image."""
    if stage not in STEP_STAGES:
        return images
    values = dataclasses.asdict(cfg)
    epochs = sum(-values[name[1:]] if name.startswith("-") else values[name] for name in STEP_STAGES[stage])
    return int(epochs) * max(1, images // int(values.get("batch_size", 1)))


def _training_identity(step: Step, source_id: str | None) -> tuple:
    """What decides a step's trained model: its config class, training settings and source."""
    plugin = registry.get(step.name)
    return plugin.config, repr(sorted(registry.training_key(plugin.make_config(step.params)).items())), source_id


def estimate(plugin: str, cfg: Any, images: int, labelled: int, rates: dict[tuple[str, str], float],
             trained: bool) -> float | None:
    """Seconds to make a variant of ``plugin`` on ``images`` images of which ``labelled`` are done:
    every measured stage of the plugin at its median rate (``rates``: seconds per unit by
    (plugin, stage)) times ``stage_units``; with ``trained`` (its model is made by an earlier run,
    or its labelling has begun) only the labelling of the images left. None when the plugin's
    labelling stage was never measured."""
    if (plugin, LABEL_STAGE) not in rates:
        return None
    seconds = rates[plugin, LABEL_STAGE] * max(0, images - labelled)
    if not trained and not labelled:
        seconds += sum(rate * stage_units(stage, cfg, images)
                       for (name, stage), rate in rates.items() if name == plugin and stage != LABEL_STAGE)
    return seconds


def make_plan(cache_dir: Path, root: Path, split: str,
              runs: Sequence[tuple[Step, ...]] | None = None) -> Plan:
    """The plan of ``runs`` (default ``standard_runs()``) on ``split`` of the dataset at ``root``.

    Reads the cache without writing (a missing cache or an unscanned dataset plans every run,
    counting the split list's ids). Raises ``DatasetError`` when ``root`` is not a dataset or has
    no split ``split``, ``KeyError`` for an unknown plugin, ``ValueError`` for a misplaced step
    or a bad parameter."""
    root = Path(root).resolve()
    runs = standard_runs() if runs is None else tuple(tuple(r) for r in runs)
    dataset_id = dataset_id_for(root)
    device = torch_device()
    usable, labelled, rates = None, {}, {}
    if db_path(cache_dir).exists():
        with connect(cache_dir, read_only=True) as con:
            dataset = queries.get_dataset(con, dataset_id)
            if dataset is not None and dataset.scanned_at is not None:
                usable = len(queries.usable_images(con, dataset_id, split))
                labelled = queries.labelled_in_split(con, dataset_id, split)
            rates = queries.stage_cost_rates(con, device)
    if usable is None:
        layout = open_layout(root)
        usable = len(read_split_ids(layout.split(split)))
    planned, seen = [], set()
    for steps in runs:
        variants = chain_variants(dataset_id, steps)
        last, step = variants[-1], steps[-1]
        identity = _training_identity(step, last.source_id)
        done_images = labelled.get(last.id, 0)
        done = bool(usable) and done_images >= usable
        plugin = registry.get(step.name)
        seconds = 0.0 if done else estimate(step.name, plugin.make_config(step.params), usable, done_images,
                                            rates, identity in seen)
        seen.add(identity)
        planned.append(PlannedRun(tuple(steps), last.name, last.id, usable, seconds, done))
    return Plan(split, device, tuple(planned))


def submit_plan(cache_dir: Path, root: Path, plan: Plan) -> list[int]:
    """Queue every run of ``plan.todo`` (``jobs.submit_chain``); returns the new or reused job ids
    in order, each once. Raises as ``submit_chain``."""
    ids: list[int] = []
    for run in plan.todo:
        ids += [i for i in submit_chain(cache_dir, root, plan.split, run.steps) if i not in ids]
    return ids
