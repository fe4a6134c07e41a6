"""Benchmark: registering a dataset (listing and validating every image and mask), this code
against an earlier commit's, in one run on the same machine.

    python -m bench.register [--root DIR] [--baseline REF] [--copies 4] [--repeats 2]

Each side scans every split of the root in a fresh subprocess with 2 worker processes (as the
worker's scan job does), best of ``--repeats`` runs, alternating the two sides so both see the
same machine load. The baseline is a ``git worktree`` of ``REF`` (default: the last commit
before class sets were data). Prints images/s of both and the ratio, and, for this code, the
peak resident memory of a scan of the root and of a root ``--copies`` times larger (symlinked
images and masks under new ids), to show memory stays flat in the number of images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.core.dataset import default_voc_root

REPO = Path(__file__).resolve().parents[1]
BASELINE = "2927a49"  # README: 271 tests; the last commit with cache/voc.py

# Runs in the subprocess, with the side's repository first on sys.path.
CHILD = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import engine.core.dataset as dataset
root = Path(sys.argv[2])
start, images = time.perf_counter(), 0
for split in dataset.list_splits(root):
    if hasattr(dataset, "scan_chunks"):  # records are handed over in chunks, as the worker records them
        images += sum(len(chunk) for chunk in dataset.scan_chunks(root, split, processes=2))
    else:
        images += len(dataset.scan_split(root, split, processes=2))
seconds = time.perf_counter() - start
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"images": images, "seconds": seconds, "rss_mib": rss / 1024}))
"""


def scan(repo: Path, root: Path) -> dict:
    """One scan of ``root`` by the code in ``repo``, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(root)], check=True, capture_output=True,
                         text=True, cwd=repo).stdout
    return json.loads(out.splitlines()[-1])


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True)
    return where


def larger_root(root: Path, copies: int, where: Path) -> Path:
    """A VOCdevkit root holding every image and mask of ``root`` ``copies`` times under new ids
    (``<id>_c<k>``), as symlinks."""
    masks = next(n for n in ("SegmentationClassAug", "SegmentationClass") if (root / n).is_dir())
    for folder in ("JPEGImages", masks, "ImageSets/Segmentation"):
        (where / folder).mkdir(parents=True)
    for lst in sorted((root / "ImageSets" / "Segmentation").glob("*.txt")):
        ids = lst.read_text().split()
        names = []
        for k in range(copies):
            for image_id in ids:
                name = f"{image_id}_c{k}"
                (where / "JPEGImages" / f"{name}.jpg").symlink_to(root / "JPEGImages" / f"{image_id}.jpg")
                (where / masks / f"{name}.png").symlink_to(root / masks / f"{image_id}.png")
                names.append(name)
        (where / "ImageSets" / "Segmentation" / lst.name).write_text("\n".join(names) + "\n")
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_voc_root(), help="a VOCdevkit root")
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the code to compare with")
    parser.add_argument("--copies", type=int, default=4, help="size of the larger root for the memory figure")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        old = worktree(args.baseline, Path(tmp) / "baseline")
        try:
            runs = {"this code": [], f"baseline {args.baseline}": []}
            for _ in range(args.repeats):
                runs["this code"].append(scan(REPO, root))
                runs[f"baseline {args.baseline}"].append(scan(old, root))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
        best = {side: min(r, key=lambda x: x["seconds"]) for side, r in runs.items()}
        print(f"Registering {root} (every split), 2 worker processes, best of {args.repeats}:")
        for side, r in best.items():
            print(f"  {side:20} {r['images']:>6} images  {r['seconds']:6.2f} s  {r['images'] / r['seconds']:7.1f} images/s")
        new, base = best["this code"], best[f"baseline {args.baseline}"]
        ratio = (new["images"] / new["seconds"]) / (base["images"] / base["seconds"])
        print(f"  rate ratio this code / baseline: {ratio:.2f}x (target >= 2x)  {'PASS' if ratio >= 2 else 'FAIL'}")
        big = scan(REPO, larger_root(root, args.copies, Path(tmp) / "larger"))
        print(f"Peak resident memory of this code's scan: {new['rss_mib']:.0f} MiB at {new['images']} images, "
              f"{big['rss_mib']:.0f} MiB at {big['images']} images (x{big['rss_mib'] / new['rss_mib']:.2f} "
              f"for x{big['images'] / new['images']:.0f} images)")


if __name__ == "__main__":
    main()
