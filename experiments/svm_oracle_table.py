"""Oracle study of the SVM expansion over features: our version of the paper's Table 1.

Lyu, Beausery & Baussard, "Study of an Expansion Method Based on an Image-Specific Classifier and
Multi-Features for WSSS" (shared/papers/svm-expansion-multi-features.md), Sec. 4.2, Table 1: per
image, an SVM trained on pixels labelled by the GROUND TRUTH (the ``"svm-oracle"`` plugin of
``engine/methods/svm.py``, Fig. 5.b), for each feature (the image, F1-F5); per-class IoU and mIoU
of its predictions on train images.

Runs the registered plugin on every k-th train image of a VOCdevkit root (N images), once per
layer, and prints the layer x per-class IoU table (classes that occur in those images), with the
paper's Table 1 rows (ResNet-50 / SIPE features, n = 2,500, all 1,464 VOC train images) below.

    .venv/bin/python experiments/svm_oracle_table.py [--root DIR] [--n-images 60] [--kernel rbf]
        [--n-samples 500] [--layers rgb,F1,F2,F3,F4,F5] [--processes 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache.classes import VOC  # noqa: E402
from engine.core import registry  # noqa: E402
from engine.core.dataset import read_mask, scan_split, to_item  # noqa: E402
from engine.core.types import RunContext  # noqa: E402
from engine.ops.metrics import confusion_counts, iou_from_counts  # noqa: E402

# Table 1 of the paper (mIoU %, PASCAL VOC 2012 train), columns in VOC class order 0-20, then mean.
PAPER_TABLE_1: dict[str, list[float]] = {
    "img": [86.98, 68.79, 35.91, 64.40, 57.83, 58.97, 68.77, 62.19, 77.31, 58.65, 73.76, 69.01, 71.25,
            73.22, 57.99, 68.02, 61.07, 70.89, 74.65, 64.80, 60.96, 65.97],
    "F1": [98.98, 96.70, 89.97, 96.95, 96.39, 95.61, 96.80, 96.74, 98.32, 95.76, 97.77, 97.74, 97.82,
           97.75, 95.22, 96.87, 96.17, 97.63, 97.82, 96.70, 96.13, 96.67],
    "F2": [98.65, 92.87, 85.61, 95.38, 93.90, 95.34, 95.66, 95.63, 98.16, 94.89, 96.77, 96.76, 97.23,
           96.86, 93.93, 95.85, 95.02, 97.22, 97.47, 95.80, 95.19, 95.44],
    "F3": [98.58, 87.62, 84.83, 93.02, 91.31, 96.36, 96.74, 95.63, 97.91, 95.57, 95.73, 97.82, 96.44,
           96.31, 93.88, 96.27, 95.31, 96.53, 98.29, 96.52, 97.50, 95.15],
    "F4": [96.98, 78.48, 75.53, 86.10, 84.00, 93.96, 94.35, 91.75, 95.39, 91.04, 87.35, 96.74, 90.63,
           88.29, 89.19, 93.85, 91.03, 88.22, 96.43, 93.71, 96.69, 90.46],
    "F5": [90.19, 55.38, 66.41, 61.51, 60.54, 77.25, 80.48, 75.81, 82.78, 80.74, 72.03, 91.36, 72.52,
           71.02, 73.94, 85.84, 81.31, 72.71, 82.62, 73.93, 86.00, 75.92],
}


def default_root() -> Path:
    """The bundled data: ``<repo>/../shared/data/voc2012-animals``."""
    return (REPO.parent / "shared" / "data" / "voc2012-animals").resolve()


def oracle_counts(items, cfg, processes: int, workdir: Path) -> tuple[np.ndarray, float, int]:
    """Summed ``(21, 3)`` TP/FP/FN of the oracle plugin over ``items``, wall seconds, error count."""
    plugin = registry.get("svm-oracle")
    ctx = RunContext(classes=VOC, items=items, todo=items, workdir=workdir, processes=processes)
    counts, errors = np.zeros((VOC.num_classes, 3), np.int64), 0
    start = time.perf_counter()
    for item, result in zip(items, plugin.run(cfg, ctx)):
        if result.error is not None:
            errors += 1
            print(f"  skipped: {result.error}", file=sys.stderr)
            continue
        counts += confusion_counts(read_mask(item.mask_path, result.label.shape), result.label, VOC.num_classes)
    return counts, time.perf_counter() - start, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=default_root(), help="VOCdevkit-layout root")
    parser.add_argument("--split", default="train")
    parser.add_argument("--n-images", type=int, default=60, help="every k-th image, N in all")
    parser.add_argument("--layers", default="rgb,F1,F2,F3,F4,F5")
    parser.add_argument("--kernel", default=None, help="linear or rbf (default: the plugin's)")
    parser.add_argument("--n-samples", type=int, default=None, help="per class (default: the plugin's)")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()

    records = [r for r in scan_split(args.root, args.split, processes=args.processes) if r.problem is None]
    step = max(1, len(records) // args.n_images)
    items = [to_item(r) for r in records[::step][: args.n_images]]
    base = registry.get("svm-oracle").make_config()
    if args.kernel is not None:
        base = replace(base, kernel=args.kernel)
    if args.n_samples is not None:
        base = replace(base, n_samples=args.n_samples)
    print(f"svm-oracle (GROUND-TRUTH samples) on {len(items)} {args.split} images of {args.root} "
          f"(every {step}th); kernel {base.kernel}, n = {base.n_samples} per class"
          + (f", RBF grid long side {base.rbf_grid_side}" if base.kernel == "rbf" else ""))

    rows: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in args.layers.split(","):
            counts, seconds, errors = oracle_counts(items, replace(base, layer=layer), args.processes, Path(tmp))
            rows[layer] = iou_from_counts(counts) * 100
            print(f"  {layer:>3}: {seconds:6.1f} s wall, {seconds / len(items):.2f} s/image "
                  f"({args.processes} processes), {errors} errors", flush=True)

    present = [c for c in range(VOC.num_classes) if any(not np.isnan(r[c]) for r in rows.values())]
    names = [VOC.names[c][:6] for c in present]
    header = "feature  " + " ".join(f"{n:>6}" for n in names) + "    mIoU"
    print("\nOurs (EfficientNet-Lite0 ImageNet features), IoU %:")
    print(header)
    for layer, iou in rows.items():
        cells = " ".join("     -" if np.isnan(iou[c]) else f"{iou[c]:6.1f}" for c in present)
        print(f"{layer:<8} {cells}  {np.nanmean(iou):6.1f}")
    print("\nPaper Table 1 (ResNet-50 SIPE features, n = 2,500, VOC 2012 train), same classes; "
          "mIoU over these classes (in brackets: its mean over all 21):")
    print(header)
    for layer, values in PAPER_TABLE_1.items():
        cells = " ".join(f"{values[c]:6.1f}" for c in present)
        print(f"{layer:<8} {cells}  {np.mean([values[c] for c in present]):6.1f} ({values[-1]:.1f})")


if __name__ == "__main__":
    main()
