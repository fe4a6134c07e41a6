"""The background-threshold sweep of the README as a picture: a CAM variant's mIoU and per-class
IoU at every threshold of its grid, from its recorded sweep (no re-inference), with the
threshold the selection half prefers and its score on the report half printed.

    .venv/bin/python -m experiments.sweep_curve --variant 129b11ceecef --out docs/sweep_curve.png

The cache and dataset are the command line's defaults (``$ISLE_CACHE_DIR`` or ./workbench-cache,
the bundled voc2012-animals). The PNG is written by plotly's kaleido with the machine's Chromium.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cache import diagnostics, queries
from cache.db import connect, default_cache_dir
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root
from engine.isle.numerics import Subset
from ui.charts import sweep_chart


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--variant", required=True, help="a variant with a recorded sweep (python -m engine status)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of images that choose (rest: report)")
    p.add_argument("--out", type=Path, default=Path("docs/sweep_curve.png"))
    args = p.parse_args()
    cache, root = (args.cache or default_cache_dir()).resolve(), (args.root or default_voc_root()).resolve()
    dataset_id = dataset_id_for(root)
    with connect(cache, read_only=True) as con:
        variant = queries.get_variant(con, args.variant)
        table = diagnostics.sweep_table(con, dataset_id, args.split, args.variant)
        selection_ids, report_ids = Subset(args.fraction).split(queries.usable_image_ids(con, dataset_id, args.split))
        selection = diagnostics.sweep_table(con, dataset_id, args.split, args.variant, selection_ids)
        report = diagnostics.sweep_table(con, dataset_id, args.split, args.variant, report_ids)
    own = variant.params["bg_threshold"]
    tuned = diagnostics.tune(selection, report, own)
    for name, row in zip(("default", "best uniform", "per class"), range(3)):
        print(f"{name}: selection mIoU {100 * tuned.selection_miou[row]:.2f}, report mIoU {100 * tuned.report_miou[row]:.2f}")
    chosen = float(table.thresholds[tuned.uniform])
    figure = sweep_chart(table, own, chosen)
    figure.update_layout(title=f"{variant.name}: mIoU and per-class IoU against the background threshold, "
                               f"{args.split} ({len(selection_ids) + len(report_ids)} images); red: the selection "
                               f"half's best ({chosen:.2f})", title_font_size=13, height=460)
    figure.write_image(args.out, width=1000, height=460, scale=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
