"""Benchmark: `make demo`'s jobs (CAM, CAM -> dCRF, the ISLE ensemble and naive ISLE) with this
code and with an earlier commit's, one after the other in one run on this machine.

    python -m bench.demo_jobs [--baseline REF] [--images 320]

The baseline is a ``git worktree`` of ``REF`` (default ``3327aa3``, the code before the CAM speed
work), run by the same Python environment. Each side gets its own scratch cache and runs the
README's commands (``python -m engine run cam dcrf``, then ``python -m engine isle --name auto
--naive``) on the first ``--images`` train images of the bundled VOC split (0: all 1,861, i.e. the
whole demo: over an hour for both sides on 2 cores). Per-image and per-step costs do not depend on
the image count, so a subset gives the ratio in minutes.

Prints, for each side, the seconds of each stage as the worker measured them (``stage_costs``:
CAM training, CAM labelling, dCRF, the two merges), the commands' wall time, the ratio this /
baseline (target: at most 0.5), and the train mIoU of every variant on both sides.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import voc_subset
from cache import reports
from cache.db import connect
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (("run", "cam", "dcrf"), ("isle", "--name", "auto", "--naive"))


def run_side(code: Path, voc: Path, cache_dir: Path) -> float:
    """Run the demo's commands with the code at ``code``; their wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(code), "ISLE_CACHE_DIR": str(cache_dir), "ISLE_VOC_ROOT": str(voc),
           "ISLE_WORKER": "off"}
    start = time.perf_counter()
    for command in COMMANDS:
        done = subprocess.run([sys.executable, "-m", "engine", *command], cwd=code, env=env, capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} in {code} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def stage_seconds(cache_dir: Path) -> dict[str, float]:
    """Seconds per (plugin, stage) the worker measured, e.g. ``"cam train"``."""
    with connect(cache_dir, read_only=True) as con:
        rows = con.execute("SELECT plugin, stage, sum(seconds) FROM stage_costs WHERE plugin <> 'scan' "
                           "GROUP BY ALL ORDER BY min(finished_at)").fetchall()
    return {f"{plugin} {stage}": seconds for plugin, stage, seconds in rows}


def mious(cache_dir: Path, voc: Path) -> dict[str, float]:
    """Train mIoU (%) of every variant, by name."""
    with connect(cache_dir, read_only=True) as con:
        table = reports.iou_table(con, dataset_id_for(voc.resolve()), "train")
    return {name: 100 * float(m) for name, m in zip(table.names, table.miou)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="3327aa3", help="git ref of the code to compare against")
    parser.add_argument("--images", type=int, default=320, help="train images (0: the whole split)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        voc, ids = voc_subset(default_voc_root(), args.images, tmp / "voc")
        baseline = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            sides = {}
            for name, code, cache_dir in ((f"baseline {args.baseline}", baseline, tmp / "cache-baseline"),
                                          ("this code", REPO, tmp / "cache-this")):
                wall = run_side(code, voc, cache_dir)
                sides[name] = (wall, stage_seconds(cache_dir), mious(cache_dir, voc))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)
    (old_name, (old_wall, old_stages, old_miou)), (new_name, (new_wall, new_stages, new_miou)) = sides.items()
    print(f"{len(ids)} train images, {os.cpu_count()} CPU cores")
    print(f"{'stage':24s} {old_name:>22s} {new_name:>12s}  ratio")
    for stage in old_stages:
        old, new = old_stages[stage], new_stages.get(stage, float("nan"))
        print(f"{stage:24s} {old:20.1f} s {new:10.1f} s  {new / old:.2f}")
    print(f"{'all commands (wall)':24s} {old_wall:20.1f} s {new_wall:10.1f} s  {new_wall / old_wall:.2f}")
    for variant in old_miou:
        print(f"mIoU {variant}: {old_miou[variant]:.2f} -> {new_miou.get(variant, float('nan')):.2f}")


if __name__ == "__main__":
    main()
