"""The labelled-budget curve of the README as a picture: Algorithm 2, the stable rule and the best
single candidate chosen on n labelled selection images, scored on the fixed report subset.

    .venv/bin/python -m experiments.budget_curve --out docs/budget_curve.png

The cache and dataset are the command line's defaults (``$ISLE_CACHE_DIR`` or ./workbench-cache,
the bundled voc2012-animals); the candidates are every default ISLE candidate complete on the
split. The PNG is written by plotly's kaleido with the machine's Chromium (no download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cache.db import connect, default_cache_dir
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root
from engine.isle import assignments
from engine.isle.numerics import Subset
from ui.charts import budget_chart


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--fraction", type=float, default=0.5, help="share of images that select (rest: report)")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("docs/budget_curve.png"))
    args = p.parse_args()
    cache, root = (args.cache or default_cache_dir()).resolve(), (args.root or default_voc_root()).resolve()
    dataset_id = dataset_id_for(root)
    with connect(cache, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, args.split) if c.default]
        plan = assignments.build_plan(con, dataset_id, args.split, candidates, Subset(args.fraction))
        rows = assignments.budget_curve(con, plan, draws=args.draws)
    for row in rows:
        print(row.n, {rule: f"{row.mean[rule]:.2f} ± {row.spread[rule]:.2f}" for rule in row.mean})
    figure = budget_chart(rows)
    figure.update_layout(title=f"Labelled-budget curve: {len(candidates)} candidates, report subset of "
                               f"{len(plan.report_ids)} {args.split} images, {args.draws} draws per size")
    figure.write_image(args.out, width=900, height=420, scale=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
