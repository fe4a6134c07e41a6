"""Command line: ``python -m engine {submit,worker,run,import,status,cancel}``.

    python -m engine run cam dcrf            # queue CAM and CAM -> dCRF on train, work until done
    python -m engine submit cam --param cam.epochs=3
    python -m engine import ~/irn/result/sem_seg --name "IRN"          # a folder of <id>.png
    python -m engine import ~/irn/result/cam --name "IRN CAM" --format npy --param import.bg_threshold=0.2
    python -m engine worker                  # the background worker the app relies on
    python -m engine status                  # jobs, and mIoU per variant
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from cache import queries
from cache.db import connect, default_cache_dir
from cache.voc import VOC_CLASSES
from engine.dataset import default_voc_root
from engine.jobs import Step, cancel, dataset_id_for, submit_chain
from engine.methods.imported import FORMATS, import_step
from engine.worker import WorkerConfig, serve


def _steps(names: list[str], params: list[str]) -> list[Step]:
    """``names`` plus ``--param step.key=value`` overrides (values parsed as JSON when they can be)."""
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
    return [Step(name, overrides[name]) for name in names]


class _Bars:
    """One tqdm bar per job stage, for ``run`` and ``worker --progress``."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.key: tuple | None = None

    def __call__(self, job: dict, stage: str, done: int, total: int) -> None:
        key = (job["id"], stage)
        if key != self.key:
            if self.bar:
                self.bar.close()
            name = job.get("variant_name") or job["kind"]
            self.bar = tqdm(total=total, initial=done, desc=f"job {job['id']} {name}: {stage}", unit="it")
            self.key = key
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()


def _print_status(cache_dir: Path, root: Path, split: str) -> None:
    with connect(cache_dir, read_only=True) as con:
        for job in reversed(queries.recent_jobs(con, 20)):
            print(f"job {job['id']:>3} {job['kind']:5} {job['variant_name'] or '':24} {job['status']:9} "
                  f"{job['stage'] or '':12} {job['done']}/{job['total']} errors={job['n_errors']}"
                  + (f"  {job['error']}" if job["error"] else ""))
        dataset_id = dataset_id_for(root)
        names = {v["id"]: v["name"] for v in queries.variants(con, dataset_id)}
        labelled = queries.labelled_in_split(con, dataset_id, split)
        per_variant: dict[str, list] = {}
        for row in queries.class_counts(con, dataset_id, split):
            if row["iou"] is not None:
                per_variant.setdefault(row["variant_id"], []).append((row["class_id"], row["iou"]))
    for variant_id, ious in per_variant.items():
        miou = 100 * sum(i for _, i in ious) / len(ious)
        detail = " ".join(f"{VOC_CLASSES[c]}={100 * i:.1f}" for c, i in ious)
        print(f"{names.get(variant_id, variant_id):24} {split} images={labelled.get(variant_id, 0)} "
              f"mIoU={miou:.2f} over {len(ious)} classes | {detail}")


def _queue_and_work(cache_dir: Path, root: Path, split: str, steps: list[Step], source: str | None,
                    work: bool) -> None:
    """Queue ``steps``; with ``work``, run the jobs here until none is left (``run``, ``import``),
    then print the per-file errors of the queued jobs and the status."""
    ids = submit_chain(cache_dir, root, split, steps, source)
    print(f"queued jobs {ids}" if ids else "nothing to do: every variant of the chain is complete")
    if not work:
        return
    serve(WorkerConfig(cache_dir, until_idle=True), _Bars())
    with connect(cache_dir, read_only=True) as con:
        errors = [e for job_id in ids for e in queries.image_errors(con, job_id)]
    for error in errors[:20]:
        print(f"skipped {error['image_id']}: {error['message']}")
    if len(errors) > 20:
        print(f"... and {len(errors) - 20} more skipped image(s)")
    _print_status(cache_dir, root, split)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="cache directory (default $ISLE_CACHE_DIR or ./workbench-cache)")
    parser.add_argument("--root", type=Path, default=None, help="VOCdevkit root (default $ISLE_VOC_ROOT or the bundled voc2012-animals)")
    parser.add_argument("--split", default="train")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("submit", "run"):
        p = sub.add_parser(name, help="queue a chain" + (" and work until idle" if name == "run" else ""))
        p.add_argument("steps", nargs="+", help="a method then refinements, e.g. cam dcrf")
        p.add_argument("--param", action="append", default=[], metavar="STEP.KEY=VALUE")
        p.add_argument("--from-variant", default=None, help="refine this existing variant id")
    i = sub.add_parser("import", help="import a folder of pseudo-labels as a variant and work until done")
    i.add_argument("folder", type=Path, help="folder of <image id>.png label maps or <image id>.npy score dicts")
    i.add_argument("--name", default="", help="the variant's name (default: the folder's name)")
    i.add_argument("--format", choices=FORMATS, default=None, help="png (default) or npy")
    i.add_argument("--param", action="append", default=[], metavar="import.KEY=VALUE",
                   help="score_key, bg_threshold, keys (index|class_id): engine/methods/imported.py")
    i.add_argument("--split", default=argparse.SUPPRESS, help="as --split before the command")
    w = sub.add_parser("worker", help="run the background worker")
    w.add_argument("--until-idle", action="store_true", help="exit when no job is queued or running")
    w.add_argument("--progress", action="store_true", help="show progress bars")
    w.add_argument("--stale-seconds", type=float, default=120.0)
    w.add_argument("--processes", type=int, default=2)
    w.add_argument("--flush-seconds", type=float, default=1.0, help="how often results are recorded")
    sub.add_parser("status", help="jobs, and per-class IoU of every variant on --split")
    c = sub.add_parser("cancel", help="cancel jobs")
    c.add_argument("job_ids", nargs="+", type=int)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cache_dir = (args.cache or default_cache_dir()).resolve()
    root = (args.root or default_voc_root()).resolve()

    if args.command in ("submit", "run"):
        _queue_and_work(cache_dir, root, args.split, _steps(args.steps, args.param), args.from_variant,
                        work=args.command == "run")
    elif args.command == "import":
        params = _steps(["import"], args.param)[0].params
        if args.format:
            params["format"] = args.format
        try:
            step = import_step(args.folder, args.name, **params)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"import: {exc}") from None
        _queue_and_work(cache_dir, root, args.split, [step], None, work=True)
    elif args.command == "worker":
        cfg = WorkerConfig(cache_dir, until_idle=args.until_idle, stale_seconds=args.stale_seconds,
                           processes=args.processes, flush_seconds=args.flush_seconds)
        serve(cfg, _Bars() if args.progress else None)
    elif args.command == "status":
        _print_status(cache_dir, root, args.split)
    elif args.command == "cancel":
        cancel(cache_dir, args.job_ids)


if __name__ == "__main__":
    sys.exit(main())
