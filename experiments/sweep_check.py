"""Does a CAM variant's threshold sweep equal CAM labelled again at those thresholds?

For every pair (a CAM variant A with a sweep, another CAM variant B of the same trained model at
background threshold t on A's grid), compares A's sweep rows at t with B's counts rows, image by
image and class by class, and prints how many rows and pixels agree.

    .venv/bin/python -m experiments.sweep_check        # after e.g. run cam --param cam.bg_threshold=0.15

The cache and dataset are the command line's defaults (``$ISLE_CACHE_DIR`` or ./workbench-cache,
the bundled voc2012-animals).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cache import queries
from cache.db import connect, default_cache_dir
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root
from engine.core.registry import inference_fields, get


def _rows(con, sql: str, args: list) -> dict[tuple[str, int], tuple[int, int, int]]:
    return {(i, c): (tp, fp, fn) for i, c, tp, fp, fn in con.execute(sql, args).fetchall()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--root", type=Path, default=None)
    args = p.parse_args()
    cache, root = (args.cache or default_cache_dir()).resolve(), (args.root or default_voc_root()).resolve()
    dataset_id = dataset_id_for(root)
    with connect(cache, read_only=True) as con:
        swept = set(queries.swept_variants(con, dataset_id))
        variants = [v for v in queries.variants(con, dataset_id) if get(v.step).threshold_sweep and v.source_id is None]

        def model(v) -> tuple:  # variants of one trained model differ only in inference fields
            fields = set(inference_fields(get(v.step).config))
            return v.step, tuple(sorted((k, str(x)) for k, x in v.params.items() if k not in fields))

        for a in (v for v in variants if v.id in swept):
            grid = [r[0] for r in con.execute("SELECT DISTINCT threshold FROM sweep_counts WHERE variant_id = ? "
                                              "ORDER BY 1", [a.id]).fetchall()]
            for b in variants:
                t = b.params.get("bg_threshold")
                if model(b) != model(a) or b.params.get("class_thresholds") or t not in grid:
                    continue
                both = set(queries.label_map_rows(con, a.id)) & set(queries.label_map_rows(con, b.id))
                sweep = {k: v for k, v in _rows(con, "SELECT image_id, class_id, tp, fp, fn FROM sweep_counts "
                                                     "WHERE variant_id = ? AND threshold = ?", [a.id, t]).items()
                         if k[0] in both}
                counts = {k: v for k, v in _rows(con, "SELECT image_id, class_id, tp, fp, fn FROM counts "
                                                      "WHERE variant_id = ?", [b.id]).items() if k[0] in both}
                same = sum(sweep.get(k) == v for k, v in counts.items())
                pixels = sum(sum(v) for v in counts.values())
                verdict = "identical" if sweep == counts else "DIFFERENT"
                print(f"sweep of {a.name} ({a.id}, labelled at {a.params['bg_threshold']}) at {t:.2f} vs "
                      f"{b.name} ({b.id}) on the {len(both):,} images both labelled: {verdict}: {same:,} of "
                      f"{len(counts):,} count rows equal ({len(sweep):,} sweep rows), {pixels:,} TP+FP+FN pixels")


if __name__ == "__main__":
    main()
