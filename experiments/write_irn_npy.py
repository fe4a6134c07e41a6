"""Write a variant's stored CAM scores as IRN-style ``.npy`` dicts, to exercise the npy import.

IRN ``step/make_cam.py`` saves, per image, ``{"keys": 0-based foreground class indices,
"high_res": (K, H, W) float32 in [0, 1] at the image size}``; this writes the same from a
workbench variant's stored scores (background channel dropped, bilinearly upsampled to the image
size), so ``python -m engine import FOLDER --format npy`` can be run on a realistic folder of the
full train split without IRN installed. Usage:

    .venv/bin/python -m experiments.write_irn_npy VARIANT_ID OUT_DIR [--split train]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache import queries
from cache.db import connect, default_cache_dir
from cache.labelmaps import read_scores
from engine.core.chains import dataset_id_for
from engine.core.dataset import default_voc_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant_id")
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    cache_dir = args.cache or default_cache_dir()
    with connect(cache_dir, read_only=True) as con:
        images = queries.usable_images(con, dataset_id_for(default_voc_root()), args.split)
        rows = queries.label_map_rows(con, args.variant_id)
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for image in images:
        row = rows.get(image.image_id)
        if row is None or row[1] is None:
            continue
        classes, scores = read_scores(cache_dir / row[1])
        if classes[0] != 0:
            raise SystemExit(f"{row[1]}: expected a background channel first, got classes {classes}")
        high_res = F.interpolate(torch.from_numpy(scores[1:]).float()[None], size=(image.height, image.width),
                                 mode="bilinear", align_corners=False)[0].numpy()
        keys = np.array(classes[1:], dtype=np.int64) - 1
        np.save(args.out / f"{image.image_id}.npy", {"keys": keys, "high_res": high_res.astype(np.float16)})
        written += 1
    print(f"wrote {written} IRN-style npy dicts to {args.out}")


if __name__ == "__main__":
    main()
