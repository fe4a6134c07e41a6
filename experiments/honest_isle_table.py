"""The README's honest-ISLE rows: each assignment rule's gain over the best single candidate
in-sample, 5-fold cross-validated, and on the report half, all predicted from the cached counts.

    .venv/bin/python -m experiments.honest_isle_table [--margins -1 0 1 2]

Rules: Algorithm 2 (ISLE Sec. 3) and the stable rule at each margin (IoU points). In-sample: the
rule and the best single chosen and scored on the whole split. Cross-validated: ``validate``'s
k folds. Report half: chosen on ``Subset(0.5, seed)``'s selection images, scored on the others
(the best single chosen on the selection images too). Also prints the margin the folds prefer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cache import reports
from cache.db import connect, default_cache_dir
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root
from engine.isle import assignments, validation
from engine.isle.numerics import Subset


def _report_gain(plan: assignments.Plan) -> float:
    """Predicted ISLE minus the selection's best single, both on the report subset (%)."""
    rows = [plan.report.variant_ids.index(v) for v in plan.candidates]
    return 100 * (plan.predicted["report"].miou - plan.report.miou[rows][plan.best_single("selection")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margins", type=float, nargs="+", default=[-1.0, 0.0, 1.0, 2.0], help="IoU points")
    args = p.parse_args()
    cache, root = (args.cache or default_cache_dir()).resolve(), (args.root or default_voc_root()).resolve()
    dataset_id = dataset_id_for(root)
    rules = [assignments.AssignRule()] + [assignments.AssignRule("stable", margin=m / 100, seed=args.seed)
                                          for m in args.margins]
    with connect(cache, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, args.split) if c.default]
        whole = assignments.build_plan(con, dataset_id, args.split, candidates)
        data = reports.image_counts(con, dataset_id, args.split, candidates, whole.selection_ids)
        fold = validation.folds(data.image_ids, args.k, args.seed)
        print(f"{len(candidates)} candidates: {', '.join(whole.names)}")
        print(f"best single: {whole.names[whole.best_single()]} "
              f"{100 * whole.selection.miou[[whole.selection.variant_ids.index(v) for v in candidates]].max():.2f}")
        gains = {}
        print(f"{'rule':28} {'in-sample':>10} {'cross-validated':>18} {'report half':>12}  classes off the best single")
        for rule in rules:
            plan = assignments.build_plan(con, dataset_id, args.split, candidates, assign=rule)
            best = whole.selection.miou[[whole.selection.variant_ids.index(v) for v in candidates]][plan.best_single()]
            cv = validation.cross_validate(data.counts, fold, rule.rule(candidates, data.classes), candidates,
                                           data.classes)
            half = assignments.build_plan(con, dataset_id, args.split, candidates, Subset(0.5, args.seed), assign=rule)
            gains[rule.label()] = float(cv.gain.mean())
            moved = [plan.classes.name(c) for c in plan.classes.foreground if plan.choice[c] != plan.best_single()]
            print(f"{rule.label():28} {100 * (plan.predicted['selection'].miou - best):+10.2f} "
                  f"{100 * cv.gain.mean():+10.2f} ± {100 * cv.gain.std():4.2f} {_report_gain(half):+12.2f}  "
                  f"{len(moved)}: {', '.join(moved)}")
    print(f"the folds prefer: {max(gains, key=gains.get)}")


if __name__ == "__main__":
    main()
