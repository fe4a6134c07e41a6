"""Command line: ``python -m engine {submit,run,import,worker,isle,export,train,flags,status,sweep,confusion,recount,cancel}``.

    python -m engine run cam dcrf            # queue CAM and CAM -> dCRF on train, work until done
    python -m engine run --all               # every standard chain: the plan with estimates, confirm, work
    python -m engine submit cam --param cam.epochs=3
    python -m engine import ~/irn/result/sem_seg --name "IRN"          # a folder of <id>.png
    python -m engine import ~/irn/result/cam --name "IRN CAM" --format npy --param import.bg_threshold=0.2
    python -m engine worker                  # the background worker the app relies on
    python -m engine worker --ray auto       # per-image work as Ray tasks (ray start --head first)
    python -m engine worker --detach         # a worker in the background unless one is alive; --stop ends it
    python -m engine status                  # jobs, and mIoU per variant
    python -m engine status --metric precision --undecided ignore   # another figure and protocol
    python -m engine sweep 129b11ceecef --make-per-class   # CAM at every background threshold; tuned
                                                 # on half the images, reported on the other half
    python -m engine confusion 129b11ceecef  # which class was labelled as which
    python -m engine recount 5f3c0a1b2d4e    # confusion rows for a variant made before schema 8
    python -m engine isle --name auto --naive    # ISLE: Algorithm 2 on every complete variant,
                                                 # exact merge + naive baseline, predicted vs exact
    python -m engine isle --name mine --set cat=325fc03886c8 --fraction 0.5   # override, report subset
    python -m engine export out/isle-auto --assignment auto   # VOCdevkit folder + provenance.json
    python -m engine train isle:auto --then dcrf # DeepLabV3+ on a label set (variant id, gt,
                                                 # isle:NAME), val mIoU with and without dCRF
    python -m engine flags --kind wrong_gt > wrong_gt.txt   # images flagged on the QA page
    python -m engine isle --name clean --exclude-flagged wrong_gt   # flagged images do not select

Each subcommand is one ``_add_<name>`` function: its arguments and its handler side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache import diagnostics, qa, queries, reports
from cache.db import CacheCorrupt, connect, default_cache_dir
from cache.rows import Job
from cache.classes import ClassSet
from engine.core.chains import Step, dataset_id_for
from engine.core.dataset import DatasetError, default_voc_root
from engine.core.roots import DataRoots, PathRefused
from engine.isle import assignments
from engine.isle.export import IMAGE_MODES, ExportError, export_assignment, export_variant
from engine.isle.numerics import OVERLAP_RULES, Subset
from engine.methods.imported import FORMATS, import_step
from engine.runtime.jobs import cancel, submit_chain, submit_recount, threshold_step
from engine.runtime.plan import ISLE_AFTER, Plan, estimate_text, make_plan, submit_plan
from engine.runtime.trainings import final_plugin, submit_training, trainings
from engine.ops.sweep import DEFAULT_GRID, check_grid
from engine.runtime import supervisor
from engine.runtime.worker import WorkerConfig, serve

Handler = Callable[[argparse.Namespace], None]


def _steps(names: list[str], params: list[str], roots: DataRoots) -> list[Step]:
    """``names`` plus ``--param step.key=value`` overrides (values parsed as JSON when they can be);
    a path parameter outside the data ``roots`` exits with the refusal (``engine.core.roots``)."""
    overrides: dict[str, dict] = {name: {} for name in names}
    for text in params:
        key, sep, value = text.partition("=")
        step, dot, field = key.partition(".")
        if not sep or not dot or step not in overrides:
            raise SystemExit(f"--param {text!r}: expected STEP.KEY=VALUE with STEP one of {names}")
        try:
            overrides[step][field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[step][field] = value
    steps = [Step(name, overrides[name]) for name in names]
    try:
        roots.check_steps(steps)
    except PathRefused as exc:
        raise SystemExit(f"--param {exc}") from None
    return steps


class _Bars:
    """One tqdm bar per job stage, for ``run`` and ``worker --progress``."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.key: tuple | None = None

    def __call__(self, job: Job, stage: str, done: int, total: int) -> None:
        key = (job.id, stage)
        if key != self.key:
            if self.bar:
                self.bar.close()
            name = job.variant_name or job.kind
            self.bar = tqdm(total=total, initial=done, desc=f"job {job.id} {name}: {stage}", unit="it")
            self.key = key
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()


def _cell(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:9.2f}"


def _print_status(args: argparse.Namespace) -> None:
    metric = getattr(args, "metric", "iou")
    undecided = getattr(args, "undecided", "miss")
    for state in supervisor.worker_states(args.cache):
        job = f"job {state.row.job_id}" if state.row.job_id is not None else "idle"
        print(f"worker {state.row.name} {'alive' if state.alive else 'gone'} since {time.ctime(state.row.started_at)}, "
              f"{job}, heartbeat {state.heartbeat_age:.0f} s ago" + (" (asked to stop)" if state.row.stop_requested else ""))
    with connect(args.cache, read_only=True) as con:
        for job in reversed(queries.recent_jobs(con, limit=20)):
            print(f"job {job.id:>3} {job.kind:5} {job.variant_name or '':24} {job.status:9} "
                  f"{job.stage or '':12} {job.done}/{job.total} errors={job.n_errors}"
                  + (f"  {job.error}" if job.error else ""))
        dataset_id = dataset_id_for(args.root)
        dataset = queries.get_dataset(con, dataset_id)
        if dataset is None:
            return
        table = reports.iou_table(con, dataset_id, args.split)
        missing = diagnostics.undecided(con, dataset_id, args.split, table.variant_ids, dataset.classes.num_classes)
        truth_images = int(table.with_truth.max()) if table.with_truth.size else 0
        caption = diagnostics.protocol(con, dataset_id, args.split, truth_images, undecided).caption
    tp, fp, fn, coverage = diagnostics.apply_undecided(table.tp, table.fp, table.fn, missing.pixels, undecided)
    values = np.where(table.n_images > 0, diagnostics.metric_values(tp, fp, fn, metric), np.nan)
    label = "mIoU" if metric == "iou" else f"mean {metric}"
    if table.names:
        print(caption)
    for row, variant_id in enumerate(table.variant_ids):
        truth, n = int(table.with_truth[row]), int(table.labelled[row])
        head = f"{table.names[row]:24} {args.split} images={n}"
        held = np.flatnonzero(table.n_images[row] > 0)
        if not held.size:
            print(f"{head} {label}: no ground truth ({truth} of {n} images have masks)")
            continue
        mean = 100 * float(np.nanmean(values[row, held]))
        detail = " ".join(f"{dataset.classes.name(int(c))}=" + ("-" if np.isnan(values[row, c]) else f"{100 * values[row, c]:.1f}")
                          for c in held)
        cover = ""
        if undecided == "ignore":
            cover = (f" coverage={100 * coverage[row]:.1f}%" if missing.known[row]
                     else " coverage unknown (no confusion rows: recorded before schema 8)")
        print(f"{head} {label}={mean:.2f} over {held.size} classes and the {truth} images with ground truth"
              f"{cover} | {detail}")


def _queue_and_work(args: argparse.Namespace, steps: list[Step], source: str | None, work: bool,
                    status: bool = True) -> None:
    """Queue ``steps``; with ``work``, run the jobs here until none is left (``run``, ``import``),
    then print the per-file errors of the queued jobs and the status."""
    ids = submit_chain(args.cache, args.root, args.split, steps, source)
    print(f"queued jobs {ids}" if ids else "nothing to do: every variant of the chain is complete")
    if not work:
        return
    serve(WorkerConfig(args.cache, until_idle=True, sweep_grid=args.sweep_grid), _Bars())
    with connect(args.cache, read_only=True) as con:
        errors = [e for job_id in ids for e in queries.image_errors(con, job_id)]
    for error in errors[:20]:
        print(f"skipped {error['image_id']}: {error['message']}")
    if len(errors) > 20:
        print(f"... and {len(errors) - 20} more skipped image(s)")
    if status:
        _print_status(args)


# --- subcommands: arguments and handler side by side ----------------------------------------


def _print_plan(plan: Plan) -> None:
    print(f"The whole comparison on {plan.split} ({plan.runs[0].images if plan.runs else 0} images); estimates "
          f"from this machine's measured stage costs on {plan.device}, each of its chain's last step:")
    width = max((len(run.label) for run in plan.runs), default=0)
    for run in plan.runs:
        print(f"  {run.label:{width}}  " + ("complete, skipped" if run.done else estimate_text(run.estimate_seconds)))
    print(f"{len(plan.todo)} chain(s) to run: {plan.total_text()}.")
    print(f"Then the ISLE ensemble of the complete variants: {ISLE_AFTER}")


def _run_all(args: argparse.Namespace, work: bool) -> None:
    """``--all``: print the plan of every standard chain; unless ``--plan``, confirm (a terminal's
    question, or ``--yes``), queue its chains and, with ``work``, run them until idle."""
    if args.steps or args.from_variant or args.param:
        raise SystemExit(f"{args.command} --all: takes no steps, --param or --from-variant (it runs the standard chains)")
    try:
        plan = make_plan(args.cache, args.root, args.split)
    except (DatasetError, KeyError, ValueError) as exc:
        raise SystemExit(f"{args.command} --all: {exc}") from None
    _print_plan(plan)
    if args.plan or not plan.todo:
        return
    if not args.yes:
        if not sys.stdin.isatty():
            raise SystemExit(f"{args.command} --all: not queued; stdin is not a terminal, so pass --yes to queue "
                             f"these {len(plan.todo)} chain(s) (or --plan to only print them)")
        if input(f"Queue these {len(plan.todo)} chain(s)? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing queued")
            return
    ids = submit_plan(args.cache, args.root, plan)
    print(f"queued jobs {ids}")
    if work:
        serve(WorkerConfig(args.cache, until_idle=True, sweep_grid=args.sweep_grid), _Bars())
        _print_status(args)
        print(f"\nnext, the ISLE ensemble: {ISLE_AFTER}")


def _add_submit_and_run(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        work = args.command == "run"
        if args.all:
            _run_all(args, work)
            return
        if args.plan or args.yes:
            raise SystemExit(f"{args.command}: --plan and --yes go with --all")
        if not args.steps:
            raise SystemExit(f"{args.command}: give a method then refinements (e.g. cam dcrf), or --all")
        _queue_and_work(args, _steps(args.steps, args.param, args.roots), args.from_variant, work=work)

    for name in ("submit", "run"):
        p = sub.add_parser(name, help="queue a chain" + (" and work until idle" if name == "run" else "")
                           + ", or with --all every standard chain (the whole comparison)")
        p.add_argument("steps", nargs="*", help="a method then refinements, e.g. cam dcrf")
        p.add_argument("--param", action="append", default=[], metavar="STEP.KEY=VALUE")
        p.add_argument("--from-variant", default=None, help="refine this existing variant id")
        p.add_argument("--all", action="store_true",
                       help="every method and standard chain not complete on --split (engine/runtime/plan.py), "
                            "after printing each one's estimated time and asking")
        p.add_argument("--plan", action="store_true", help="with --all: only print the plan")
        p.add_argument("--yes", action="store_true", help="with --all: queue without asking (needed without a terminal)")
        p.set_defaults(func=handle)


def _add_import(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        params = _steps(["import"], args.param, args.roots)[0].params
        if args.format:
            params["format"] = args.format
        try:
            step = import_step(args.folder, args.name, **params)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"import: {exc}") from None
        _queue_and_work(args, [step], None, work=True)

    p = sub.add_parser("import", help="import a folder of pseudo-labels as a variant and work until done")
    p.add_argument("folder", type=Path, help="folder of <image id>.png label maps or <image id>.npy score dicts")
    p.add_argument("--name", default="", help="the variant's name (default: the folder's name)")
    p.add_argument("--format", choices=FORMATS, default=None, help="png (default) or npy")
    p.add_argument("--param", action="append", default=[], metavar="import.KEY=VALUE",
                   help="score_key, bg_threshold, keys (index|class_id): engine/methods/imported.py")
    p.add_argument("--split", default=argparse.SUPPRESS, help="as --split before the command")
    p.set_defaults(func=handle)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        cfg = WorkerConfig(args.cache, until_idle=args.until_idle, stale_seconds=args.stale_seconds,
                           processes=args.processes, ray_address=args.ray, flush_seconds=args.flush_seconds,
                           sweep_grid=args.sweep_grid)
        if args.stop:
            names = supervisor.stop_workers(args.cache)
            print(f"asked to stop: {', '.join(names)}" if names else "no live worker")
            if names and not supervisor.wait_stopped(args.cache, names):
                raise SystemExit("a worker did not stop within 60 s (it stops at its next flush; see `status`)")
            return
        if args.detach:
            if args.until_idle or args.progress:
                raise SystemExit("worker --detach: --until-idle and --progress are for a worker in this terminal")
            alive, pid = supervisor.ensure_worker(args.cache, _worker_args(args), _global_args(args))
            if alive:
                print(f"a worker is alive already: {alive[0].name} (since {time.ctime(alive[0].started_at)})")
            else:
                print(f"worker started, PID {pid}; its log: {supervisor.log_path(args.cache)}")
            return
        if args.ray:
            from engine.ops.ray_pool import connect

            connect(args.ray)  # a wrong address fails here, not in the first job
        serve(cfg, _Bars() if args.progress else None)

    p = sub.add_parser("worker", help="run the background worker")
    p.add_argument("--until-idle", action="store_true", help="exit when no job is queued or running")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--stale-seconds", type=float, default=120.0)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run per-image work (dCRF, SVM, random walk, merges) as tasks on the Ray cluster at "
                        "ADDRESS (host:port of its head; auto: this machine's, started if none)")
    p.add_argument("--flush-seconds", type=float, default=1.0, help="how often results are recorded")
    p.add_argument("--detach", action="store_true",
                   help="start a worker in the background unless one is alive (engine/runtime/supervisor.py; "
                        "its log: <cache>/logs/worker.log), then return")
    p.add_argument("--stop", action="store_true",
                   help="ask every live worker to stop (finished images recorded, its job requeued) and wait")
    p.set_defaults(func=handle)


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The worker options of ``args`` as arguments for a detached ``worker``."""
    out = ["--processes", str(args.processes), "--stale-seconds", str(args.stale_seconds),
           "--flush-seconds", str(args.flush_seconds)]
    return out + (["--ray", args.ray] if args.ray else [])


def _global_args(args: argparse.Namespace) -> list[str]:
    """The common options a detached worker needs (its threshold grid)."""
    return ["--sweep-grid", ",".join(f"{t:g}" for t in args.sweep_grid)]


def _overrides(texts: list[str], classes: ClassSet) -> dict[int, str]:
    """``--set CLASS=VARIANT`` (class name or id) as ``{class id: variant id}``."""
    out = {}
    for text in texts:
        name, sep, variant = text.partition("=")
        class_id = int(name) if name.isdigit() else classes.names.index(name) if name in classes.names else -1
        if not sep or class_id not in classes.foreground:
            raise SystemExit(f"--set {text!r}: expected CLASS=VARIANT_ID with CLASS an object class name or id "
                             f"({classes.describe(classes.foreground[:3])}, ...)")
        out[class_id] = variant
    return out


def _print_summary(s: assignments.Summary) -> None:
    keys = ["selection"] + (["report"] if s.subset.report_images else [])
    print(f"\nISLE on {s.split}: rule {s.rule}, selection {s.subset.selection_images} images, "
          f"report {s.subset.report_images} images (IoU in %; * = overridden; lost px = pixels the "
          f"class lost in overlaps, of which on its ground truth (TP) and elsewhere (FP))")
    header = f"{'class':12} {'imgs':>5} {'chosen variant':40}" + "".join(
        f" {'pred ' + k[:3]:>9} {'exact ' + k[:3]:>9}" for k in keys) + f" {'lost px':>8} {'of TP':>8} {'of FP':>8}"
    print(header)
    for c in s.classes:
        mark = "*" if c.overridden else " "
        cells = "".join(f" {_cell(getattr(c.predicted_iou, k))} {_cell(getattr(c.exact_iou, k))}" for k in keys)
        explained = "".join(f" {'-' if v is None else v:>8}" for v in (c.tp_lost, c.fp_lost))
        print(f"{c.class_name:12} {c.images:>5} {mark}{c.variant_name[:39]:39}{cells} {c.lost_pixels:>8}{explained}")
    for k in keys:
        m = getattr(s.miou, k)
        print(f"{k:9} mIoU: best single {_cell(m.best_single)} | ISLE predicted {_cell(m.predicted)} "
              f"exact {_cell(m.exact)} | naive {_cell(m.naive)} | background predicted "
              f"{_cell(m.predicted_background_iou)} exact {_cell(m.exact_background_iou)}")
    for row in s.conflicts[:10]:
        print(f"conflict: {row.winner} won {row.pixels} px from {row.loser} in {row.images} images")


def _add_isle(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        """Algorithm 2 (+ overrides), save the assignment, run the exact merge (and naive ISLE),
        print predicted vs exact, export if asked."""
        try:
            _isle(args)
        except (ExportError, KeyError, ValueError) as exc:
            raise SystemExit(f"isle: {exc}") from None

    p = sub.add_parser("isle", help="ISLE: assign each class its best variant, merge exactly, report")
    p.add_argument("--candidates", nargs="+", default=None, metavar="VARIANT_ID",
                   help="default: every variant complete on --split, oracles and ensembles excepted")
    p.add_argument("--name", default="auto", help="save the assignment under this name (a new version)")
    p.add_argument("--overlap", choices=OVERLAP_RULES, default="score", help="overlap rule of the merge")
    p.add_argument("--rule", choices=assignments.ASSIGN_RULES, default="algorithm2",
                   help="assignment rule: ISLE Algorithm 2, or stable (a class leaves the best single "
                        "candidate only when its bootstrap gain is sure, see --margin)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="stable rule: the lower end of the gain's 95%% interval must exceed this, in IoU points")
    p.add_argument("--cv", type=int, default=5, metavar="K",
                   help="print the K-fold cross-validated gain beside the in-sample one (0: skip)")
    p.add_argument("--budget-curve", action="store_true",
                   help="only print the labelled-budget curve (needs --fraction < 1: the report subset)")
    p.add_argument("--draws", type=int, default=20, help="budget curve: seeded draws per size")
    p.add_argument("--fraction", type=float, default=1.0, help="share of images that select (rest: report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection/report split")
    p.add_argument("--set", action="append", default=[], metavar="CLASS=VARIANT_ID", help="override a class")
    p.add_argument("--exclude-flagged", nargs="*", choices=tuple(qa.FLAG_KINDS), default=None, metavar="KIND",
                   help=f"keep images flagged on the QA page out of the selection subset (kinds: "
                        f"{', '.join(qa.FLAG_KINDS)}; none given: every kind)")
    p.add_argument("--naive", action="store_true", help="also run naive ISLE (the paper's baseline)")
    p.add_argument("--export", type=Path, default=None, metavar="DIR", help="then export the ensemble here")
    p.add_argument("--images", choices=IMAGE_MODES, default="link", help="JPEGImages in the export")
    p.set_defaults(func=handle)


def _isle(args: argparse.Namespace) -> None:
    dataset_id, split = dataset_id_for(args.root), args.split
    assign = assignments.AssignRule(args.rule, margin=args.margin / 100)
    with connect(args.cache, read_only=True) as con:
        exclude = () if args.exclude_flagged is None else qa.flagged_ids(con, dataset_id, args.exclude_flagged or None)
        subset = Subset(fraction=args.fraction, seed=args.seed, exclude=tuple(exclude))
        if exclude:
            print(f"{len(exclude)} flagged image(s) kept out of the selection subset")
        candidates = args.candidates or [c.variant.id for c in assignments.complete_variants(con, dataset_id, split)
                                         if c.default]
        dataset = queries.get_dataset(con, dataset_id)
        if dataset is None:
            raise SystemExit(f"{args.root}: not registered yet (run a method on it first)")
        overrides = _overrides(args.set, dataset.classes)
        plan = assignments.build_plan(con, dataset_id, split, candidates, subset, overrides, args.overlap, assign)
        if args.budget_curve:
            _print_budget(assignments.budget_curve(con, plan, draws=args.draws, seed=args.seed,
                                                   margin=assign.margin), plan)
            return
    with connect(args.cache) as con:
        version = assignments.save(con, plan, args.name)
    print(f"assignment {args.name!r} ({assign.label()}) saved (version id {version}) over {len(candidates)} candidates")
    steps = [assignments.merge_step(plan, args.name)] + ([assignments.naive_step(plan)] if args.naive else [])
    for step in steps:
        _queue_and_work(args, [step], None, work=True, status=False)
    with connect(args.cache, read_only=True) as con:
        saved = assignments.decode(queries.get_assignment(con, version))
        plan = assignments.rebuild(con, dataset_id, split, saved)
        ids = [assignments.step_variant_id(dataset_id, step) for step in steps]
        _print_summary(assignments.summary(con, plan, *ids))
        if args.cv:
            _print_validation(assignments.validate(con, plan, k=args.cv, seed=args.seed))
    if args.export:
        done = export_assignment(args.cache, dataset_id, split, saved, args.export, args.images)
        print(f"exported {done.images} label maps to {done.dest}")


def _print_validation(v: assignments.Validation) -> None:
    print(f"\noff-sample, over the {v.images} selection images with ground truth (mIoU %):")
    print(f"in-sample gain of ISLE over the best single: {_signed(v.in_sample_gain)}")
    for f in v.cv:
        print(f"{f.k}-fold cross-validated, {f.rule}: ISLE {_cell(f.isle)} vs best single {_cell(f.single)}, "
              f"gain {_signed(f.gain)} ± {f.spread:.2f} (folds: {', '.join(_signed(g) for g in f.gains)})")
    print(f"per-class confidence ({v.resamples} bootstrap resamples; interval {100 * v.level:.0f}% of the IoU "
          f"gain over the rival, the candidate the choice beats least often):")
    for c in v.classes:
        if c.rival is None:
            print(f"  {c.class_name:12} {c.verdict}")
        else:
            print(f"  {c.class_name:12} {c.verdict:9} wins {100 * c.share:5.1f}% vs {c.rival_name[:40]:40} "
                  f"gain {_signed(c.low)} to {_signed(c.high)}")


def _print_budget(rows: tuple[assignments.BudgetRow, ...], plan: assignments.Plan) -> None:
    print(f"labelled-budget curve: chosen on n of the {len(plan.selection_ids)} selection images, "
          f"scored on the {len(plan.report_ids)} report images (report mIoU %, mean ± spread over the draws)")
    rules = list(rows[0].mean)
    print(f"{'n':>6} " + " ".join(f"{r[:24]:>24}" for r in rules))
    for row in rows:
        print(f"{row.n:>6} " + " ".join(f"{_cell(row.mean[r]):>15} ± {row.spread[r]:5.2f}" for r in rules))


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _add_export(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        try:
            if args.variant:
                done = export_variant(args.cache, args.variant, args.dest, images=args.images)
            else:
                dataset_id = dataset_id_for(args.root)
                with connect(args.cache, read_only=True) as con:
                    history = queries.assignment_history(con, dataset_id, args.split, args.assignment)
                if not history:
                    raise ExportError(f"no saved assignment {args.assignment!r} on {args.split}")
                done = export_assignment(args.cache, dataset_id, args.split, assignments.decode(history[-1]),
                                         args.dest, args.images)
        except ExportError as exc:
            raise SystemExit(f"export: {exc}") from None
        print(f"exported {done.images} label maps to {done.dest}"
              + (f"; {len(done.missing)} image(s) without a label map left out" if done.missing else ""))

    p = sub.add_parser("export", help="write a variant or a saved ISLE assignment as a VOCdevkit folder")
    p.add_argument("dest", type=Path)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--variant", help="variant id")
    what.add_argument("--assignment", help="name of a saved assignment (its latest version)")
    p.add_argument("--images", choices=IMAGE_MODES, default="link", help="JPEGImages: symlinks, copies or none")
    p.set_defaults(func=handle)


def _add_train(sub: argparse._SubParsersAction) -> None:
    final = final_plugin().name

    def handle(args: argparse.Namespace) -> None:
        """Queue a training, work until done, print every training's mIoU on ``--on``."""
        params = _steps([final], args.param, args.roots)[0].params
        try:
            queued = submit_training(args.cache, args.root, args.label_set, params,
                                     then=[Step(name) for name in args.then], split=args.on, train_split=args.split)
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"train: {exc}") from None
        print(f"queued jobs {queued.job_ids}" if queued.job_ids else "nothing to do: this training is complete")
        serve(WorkerConfig(args.cache, until_idle=True, sweep_grid=args.sweep_grid), _Bars())
        with connect(args.cache, read_only=True) as con:
            rows = trainings(con, dataset_id_for(args.root), args.on)
        print(f"\nTrainings, mIoU on {args.on} (%):")
        for r in rows:
            refined = "".join(f"  with {x.title} {_cell(x.miou).strip()}" for x in r.refined)
            print(f"{r.label_set[:60]:60} mIoU {_cell(r.miou).strip():>6}{refined}"
                  f"  ({r.images} images, {r.variant_id})")

    p = sub.add_parser("train", help="train the final network (DeepLabV3+) on a label set of --split, evaluate on --on")
    p.add_argument("label_set", help="a variant id, 'gt' (the ground truth), or 'isle:NAME' (a saved assignment)")
    p.add_argument("--param", action="append", default=[], metavar=f"{final}.KEY=VALUE",
                   help="its config fields: epochs, crop_size, batch_size, lr, encoder, seed, ...")
    p.add_argument("--then", nargs="+", default=[], metavar="REFINEMENT",
                   help="refine the predictions too (e.g. dcrf: test-time dCRF), each scored on its own")
    p.add_argument("--on", default="val", help="the split the model predicts and is scored on")
    p.set_defaults(func=handle)


def _add_flags(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        """The flagged images of the dataset: ids (sorted, once each), or one flag a line."""
        with connect(args.cache, read_only=True) as con:
            rows = qa.flags(con, dataset_id_for(args.root), args.kind)
        if args.table:
            for r in sorted(rows, key=lambda r: (r["image_id"], r["kind"])):
                print("\t".join([r["image_id"], r["kind"], r["note"], r["variant_id"] or ""]))
        else:
            for image_id in sorted({r["image_id"] for r in rows}):
                print(image_id)

    p = sub.add_parser("flags", help="the images flagged on the QA page, one id per line (or with --table)")
    p.add_argument("--kind", nargs="+", choices=tuple(qa.FLAG_KINDS), default=None, help="only these kinds")
    p.add_argument("--table", action="store_true", help="also kind, note and variant, tab-separated")
    p.set_defaults(func=handle)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="jobs, and per-class IoU (or another metric) of every variant on --split")
    p.add_argument("--metric", choices=tuple(diagnostics.METRICS), default="iou", help="the per-class figure")
    p.add_argument("--undecided", choices=tuple(diagnostics.UNDECIDED), default="miss",
                   help="a predicted 255: a miss of the true class (default) or ignored (coverage printed)")
    p.set_defaults(func=_print_status)


def _variant(con, args: argparse.Namespace, variant_id: str):
    """The variant ``variant_id`` of the command's dataset; ``SystemExit`` naming the valid ids."""
    variant = queries.get_variant(con, variant_id)
    if variant is None or variant.dataset_id != dataset_id_for(args.root):
        valid = ", ".join(f"{v.id} ({v.name})" for v in queries.variants(con, dataset_id_for(args.root)))
        raise SystemExit(f"no variant {variant_id!r} on {args.root}; valid: {valid or 'none'}")
    return variant


def _percent(values) -> str:
    return " ".join("    -" if np.isnan(v) else f"{100 * v:5.1f}" for v in values)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        dataset_id = dataset_id_for(args.root)
        with connect(args.cache, read_only=True) as con:
            variant = _variant(con, args, args.variant)
            table = diagnostics.sweep_table(con, dataset_id, args.split, variant.id)
            if table is None:
                raise SystemExit(f"{variant.name}: no threshold sweep recorded (only a method with a threshold, "
                                 "e.g. CAM, made by this version's worker has one)")
            ids = queries.usable_image_ids(con, dataset_id, args.split)
            selection_ids, report_ids = Subset(args.fraction, args.seed).split(ids)
            selection = diagnostics.sweep_table(con, dataset_id, args.split, variant.id, selection_ids)
            report = diagnostics.sweep_table(con, dataset_id, args.split, variant.id, report_ids) if report_ids else None
            caption = diagnostics.protocol(con, dataset_id, args.split, len(ids)).caption
        classes = table.classes
        held = np.flatnonzero(table.has_class)
        print(f"{variant.name} ({variant.id}): background-threshold sweep on {args.split}, {caption}")
        print(f"{'threshold':>9} {'mIoU':>5} | " + " ".join(f"{classes.name(int(c))[:5]:>5}" for c in held))
        iou = table.metric("iou")
        for j, t in enumerate(table.thresholds):
            print(f"{t:9.2f} {100 * table.miou[j]:5.1f} | {_percent(iou[j, held])}")
        own = variant.params.get("bg_threshold")
        best = diagnostics.best_threshold(table)
        print(f"best threshold on the split's images: {table.thresholds[best]:.2f} "
              f"(mIoU {100 * table.miou[best]:.2f}; the variant's own {own}: "
              + (f"{100 * table.miou[np.isclose(table.thresholds, own)][0]:.2f})" if own is not None
                 and np.isclose(table.thresholds, own).any() else "not on the grid)"))
        tuned = None
        if report is not None and own is not None and np.isclose(table.thresholds, own).any():
            tuned = diagnostics.tune(selection, report, own)
            print(f"\nchosen on the selection subset ({len(selection_ids)} images, fraction {args.fraction}, "
                  f"seed {args.seed}), reported on the other {len(report_ids)}:")
            for name, row in (("default", 0), ("best uniform", 1), ("per class", 2)):
                what = (f"{table.thresholds[tuned.default]:.2f}" if row == 0 else
                        f"{table.thresholds[tuned.uniform]:.2f}" if row == 1 else "tuned per class")
                print(f"{name:>13} ({what}): selection mIoU {100 * tuned.selection_miou[row]:.2f}, "
                      f"report mIoU {100 * tuned.report_miou[row]:.2f}")
            print("per-class thresholds: " + " ".join(
                f"{classes.name(int(c))}={tuned.thresholds[c]:.2f}" for c in held if c != classes.background))
        elif args.make_per_class:
            raise SystemExit("--make-per-class needs a report subset (--fraction < 1) and the variant's threshold on the grid")
        if args.make is not None:
            _queue_and_work(args, [threshold_step(variant, bg_threshold=args.make)], None, work=True, status=False)
        if args.make_per_class and tuned is not None:
            per_class = [float(tuned.thresholds[c]) for c in range(1, classes.num_classes)]
            _queue_and_work(args, [threshold_step(variant, class_thresholds=per_class)], None, work=True, status=False)

    p = sub.add_parser("sweep", help="per-class IoU of a CAM-like variant at every background threshold of its grid")
    p.add_argument("variant", help="variant id (python -m engine status lists them)")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="share of images that choose the thresholds (rest: report), as the ISLE subsets")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection/report split")
    p.add_argument("--make", type=float, default=None, metavar="T",
                   help="then make the variant at background threshold T (an ordinary variant)")
    p.add_argument("--make-per-class", action="store_true",
                   help="then make the variant at the per-class thresholds tuned on the selection subset")
    p.set_defaults(func=handle)


def _add_confusion(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        dataset_id = dataset_id_for(args.root)
        with connect(args.cache, read_only=True) as con:
            variant = _variant(con, args, args.variant)
            matrix = diagnostics.confusion_matrix(con, dataset_id, args.split, variant.id)
            images = len(queries.usable_image_ids(con, dataset_id, args.split))
            caption = diagnostics.protocol(con, dataset_id, args.split, images).caption
        if matrix is None:
            raise SystemExit(f"{variant.name}: no confusion rows (recorded before schema 8): "
                             f"python -m engine recount {variant.id}")
        shares = matrix.normalised()
        size = matrix.classes.num_classes
        print(f"{variant.name} ({variant.id}): ground-truth class labelled as another, on {args.split}, {caption}")
        cells = [(int(g), int(p)) for g, p in zip(*np.nonzero(matrix.pixels)) if g != p]
        cells.sort(key=lambda cell: -matrix.pixels[cell])
        print(f"{'ground truth':>14} -> {'labelled as':<16} {'pixels':>11} {'row share':>9} {'images':>6}")
        for g, p in cells[:args.top]:
            print(f"{matrix.classes.name(g):>14} -> {matrix.column_label(p):<16} {matrix.pixels[g, p]:11,d} "
                  f"{100 * shares[g, p]:8.1f}% {matrix.images[g, p]:6d}")
        if args.matrix:
            rows = [c for c in range(size) if matrix.pixels[c].any()]
            columns = [c for c in range(size + 1) if matrix.pixels[:, c].any()]
            print("\nrow-normalised (%), rows = ground truth, columns = labelled as:")
            print(f"{'':>12} " + " ".join(f"{matrix.column_label(c)[:5]:>5}" for c in columns))
            for g in rows:
                print(f"{matrix.classes.name(g)[:12]:>12} {_percent(shares[g, columns])}")

    p = sub.add_parser("confusion", help="which ground-truth class a variant labelled as which (top confusions)")
    p.add_argument("variant", help="variant id")
    p.add_argument("--top", type=int, default=15, help="how many off-diagonal cells to list, most pixels first")
    p.add_argument("--matrix", action="store_true", help="also print the row-normalised matrix")
    p.set_defaults(func=handle)


def _add_cancel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cancel", help="cancel jobs")
    p.add_argument("job_ids", nargs="+", type=int)
    p.set_defaults(func=lambda args: cancel(args.cache, args.job_ids))


def _add_recount(sub: argparse._SubParsersAction) -> None:
    def handle(args: argparse.Namespace) -> None:
        try:
            job = submit_recount(args.cache, args.variant)
        except KeyError as exc:
            raise SystemExit(f"recount: {exc.args[0]}") from None
        if job is None:
            print("nothing to do: every label map with ground truth has its confusion rows")
            return
        print(f"queued job {job}")
        serve(WorkerConfig(args.cache, until_idle=True, sweep_grid=args.sweep_grid), _Bars())

    p = sub.add_parser("recount", help="count a variant's label maps again: counts and class confusion "
                                       "(a variant recorded before schema 8), then work until idle")
    p.add_argument("variant", help="variant id")
    p.set_defaults(func=handle)


SUBCOMMANDS = (_add_submit_and_run, _add_import, _add_worker, _add_isle, _add_export, _add_train, _add_flags,
               _add_status, _add_sweep, _add_confusion, _add_recount, _add_cancel)


def _grid(text: str) -> tuple[float, ...]:
    """``"0.05:0.6:0.05"`` (both ends included) or ``"0.1,0.2,0.3"`` as a threshold grid."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            count = int(round((stop - start) / step)) + 1
            values = [round(start + k * step, 6) for k in range(count)]
        else:
            values = [float(v) for v in text.split(",")]
        return check_grid(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def parser() -> argparse.ArgumentParser:
    """The argument parser: common options, then one sub-parser per ``SUBCOMMANDS`` entry."""
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=None,
                   help="cache directory (default $ISLE_CACHE_DIR or ./workbench-cache)")
    p.add_argument("--dataset", "--root", dest="root", type=Path, default=None,
                   help="dataset folder (VOCdevkit, COCO 2014 as ToCo/MCTformer lay it out, or one with a "
                        "dataset.toml) or a description file (default $ISLE_VOC_ROOT or the bundled "
                        "voc2012-animals)")
    p.add_argument("--split", default="train")
    p.add_argument("--sweep-grid", type=_grid, default=DEFAULT_GRID, metavar="START:STOP:STEP | T,T,...",
                   help="background thresholds at which the worker also counts a CAM-like variant's labels "
                        "(default 0.05:0.60:0.05)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.cache = (args.cache or default_cache_dir()).resolve()
    args.roots = DataRoots.configured(args.cache)
    try:
        _check_path_arguments(args)
    except PathRefused as exc:
        raise SystemExit(str(exc)) from None
    args.root = (args.root or default_voc_root()).resolve()
    try:
        args.func(args)
    except CacheCorrupt as exc:  # what is wrong and how to recover, not a traceback; the file is untouched
        raise SystemExit(str(exc)) from None


# Every path argument a subcommand takes, and whether it is read or written (engine.core.roots).
PATH_ARGUMENTS = {"root": ("read", "--dataset"), "folder": ("read", "import folder"),
                  "dest": ("write", "export destination"), "export": ("write", "--export")}


def _check_path_arguments(args: argparse.Namespace) -> None:
    """Refuse, before anything is read, a path argument outside the data roots."""
    for attr, (mode, what) in PATH_ARGUMENTS.items():
        value = getattr(args, attr, None)
        if value is not None:
            args.roots.check(mode, value, what)
