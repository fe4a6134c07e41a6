"""Benchmark: the exact ISLE merge as the engine runs it vs a plain per-image loop, same run.

    python -m bench.ensemble_merge [--cache DIR] [--sizes 200 0]

Both do the same work per image: read the chosen candidates' label maps (and, at overlap pixels,
their scores), merge (``engine.isle.numerics.merge_slices``, rule "score"), count against the ground
truth and write the palette PNG.

- **plain loop**: one process, one image after the other, nothing recorded in DuckDB.
- **engine**: ``python -m engine worker --until-idle --processes 2`` on a scratch copy of the
  cache (the DuckDB file copied, the candidates' label and score folders symlinked), i.e. the
  ``isle`` plugin streaming images through 2 spawned processes while the worker writes PNGs,
  counts and conflicts in batches. Its peak resident memory (worker + pool processes, sampled
  from /proc every 0.2 s) is printed per size, to show it does not grow with the number of images.

The assignment is Algorithm 2 over the cache's default candidates (every complete variant,
oracles and ensembles excepted) on the whole split. Prints seconds, images/s and the ratio
plain / engine. Needs a cache with complete candidates (``make demo`` plus more methods).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache import queries
from cache.db import connect, db_path, default_cache_dir
from cache.labelmaps import write_label_map
from cache.rows import ImageRow
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root, read_mask
from engine.isle import assignments
from engine.isle.merge import _class_score, _read_label
from engine.isle.numerics import merge_slices
from engine.ops.metrics import confusion_counts

REPO = Path(__file__).resolve().parents[1]


def plain_loop(cache_dir: Path, images: list[ImageRow], plan: assignments.Plan, out: Path) -> float:
    """Seconds for the straightforward loop over ``images``."""
    files = {}
    with connect(cache_dir, read_only=True) as con:
        for v in set(plan.candidates):
            files[v] = queries.label_map_rows(con, v)
    start = time.perf_counter()
    for image in images:
        size = (image.height, image.width)
        claims, scores = {}, {}
        for c in image.labels:
            label_path, scores_path = files[plan.chosen(c)][image.image_id]
            claims[c] = _read_label(cache_dir / label_path, size, image.image_id) == c
            scores[c] = cache_dir / scores_path if scores_path else None
        label, _ = merge_slices(claims, image.labels, plan.priority, plan.rule,
                                lambda c: _class_score(scores[c], c, size), classes=plan.classes)
        confusion_counts(read_mask(Path(image.mask_path), size), label, plan.classes.num_classes)
        write_label_map(out / f"{image.image_id}.png", label)
    return time.perf_counter() - start


def scratch_cache(cache_dir: Path, plan: assignments.Plan, keep: list[str], dest: Path) -> None:
    """A copy of the cache's DuckDB file at ``dest`` whose split holds only ``keep`` images,
    with the candidates' label and score folders symlinked, and the merge variant not yet made."""
    shutil.copyfile(db_path(cache_dir), db_path(dest))
    for folder in ("labels", "scores"):
        (dest / folder).mkdir()
        for v in plan.candidates:
            if (cache_dir / folder / v).is_dir():
                (dest / folder / v).symlink_to(cache_dir / folder / v)
    merged = assignments.step_variant_id(plan.dataset_id, assignments.merge_step(plan))
    with connect(dest) as con:
        con.execute("DELETE FROM images WHERE dataset_id = ? AND split = ? AND image_id NOT IN (SELECT unnest(?))",
                    [plan.dataset_id, plan.split, keep])
        for table in ("label_maps", "counts", "conflicts"):
            con.execute(f"DELETE FROM {table} WHERE variant_id = ?", [merged])
        con.execute("DELETE FROM jobs WHERE variant_id = ?", [merged])


_WORKER = """
import json, sys, time
from pathlib import Path
from engine.core.chains import Step
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
cache, root, split, params = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
submit_chain(cache, root, split, [Step("isle", params, title="ISLE (bench)")])
start = time.perf_counter()
serve(WorkerConfig(cache, until_idle=True, poll_seconds=0.05, processes=2))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _tree_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (Linux /proc)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry.name)] = int(fields["PPid"])
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0.0) for p in tree)


def engine_run(cache_dir: Path, root: Path, plan: assignments.Plan) -> dict:
    """The merge job through a real worker process on ``cache_dir``: seconds (from the worker
    loop's start, after its imports) and the peak resident memory of the worker and its pool."""
    params = assignments.merge_step(plan).params
    process = subprocess.Popen([sys.executable, "-c", _WORKER, str(cache_dir), str(root), plan.split, json.dumps(params)],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _tree_rss_mb(process.pid))
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(f"the worker failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument("--root", type=Path, default=default_voc_root())
    parser.add_argument("--split", default="train")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 0], help="image counts; 0 = the whole split")
    args = parser.parse_args()
    dataset_id = dataset_id_for(args.root.resolve())
    with connect(args.cache, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, args.split) if c.default]
        plan = assignments.build_plan(con, dataset_id, args.split, candidates)
        images = queries.usable_images(con, dataset_id, args.split)
    print(f"{len(candidates)} candidates, {len(images)} images on {args.split}; {os.cpu_count()} CPU cores")
    for size in args.sizes:
        subset = images[:size] if size else images
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "plain").mkdir()
            plain = plain_loop(args.cache, subset, plan, tmp / "plain")
            (tmp / "cache").mkdir()
            scratch_cache(args.cache, plan, [i.image_id for i in subset], tmp / "cache")
            ours = engine_run(tmp / "cache", args.root, plan)
        n = len(subset)
        print(f"{n:5d} images | plain loop {plain:7.1f} s ({n / plain:5.1f} img/s) | engine {ours['seconds']:7.1f} s "
              f"({n / ours['seconds']:5.1f} img/s) | ratio plain/engine {plain / ours['seconds']:.2f} | peak memory "
              f"of the worker and its pool {ours['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
