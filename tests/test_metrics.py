"""Confusion counts and IoU, by hand and against scikit-learn on real masks."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.metrics import confusion_matrix

from cache.classes import VOC
from engine.ops.metrics import confusion_counts, iou_from_counts


def test_counts_on_a_3x3_map_worked_out_by_hand():
    gt = np.array([[0, 0, 8], [0, 8, 8], [255, 8, 12]], np.uint8)
    pred = np.array([[0, 8, 8], [0, 0, 8], [8, 255, 8]], np.uint8)
    counts = confusion_counts(gt, pred, VOC.num_classes)
    # background: TP (0,0),(1,0); FP (1,1) predicted 0 on a cat; FN (0,1) predicted cat
    assert counts[0].tolist() == [2, 1, 1]
    # cat: TP (0,2),(1,2); FP (0,1),(2,2); FN (1,1) -> 0, (2,1) -> 255
    assert counts[8].tolist() == [2, 2, 2]
    # dog: its only pixel predicted cat; the GT-255 pixel predicted 8 counts for nobody
    assert counts[12].tolist() == [0, 0, 1]
    assert counts.sum() == 2 + 1 + 1 + 2 + 2 + 2 + 1
    iou = iou_from_counts(counts)
    assert iou[0] == 2 / 4 and iou[8] == 2 / 6 and iou[12] == 0
    assert np.isnan(iou[3])


def test_counts_match_sklearn_on_real_masks(voc_root):
    ids = (voc_root / "ImageSets/Segmentation/train.txt").read_text().split()[:6]
    rng = np.random.default_rng(0)
    total = np.zeros((21, 3), np.int64)
    gts, preds = [], []
    for image_id in ids:
        gt = np.array(Image.open(voc_root / "SegmentationClassAug" / f"{image_id}.png"))
        pred = gt.copy()
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.choice([0, 8, 12, 255], size=noise.sum())
        total += confusion_counts(gt, pred, VOC.num_classes)
        gts.append(gt.ravel())
        preds.append(pred.ravel())
    gt, pred = np.concatenate(gts), np.concatenate(preds)
    keep = gt != 255
    cm = confusion_matrix(gt[keep], pred[keep], labels=[*range(21), 255])
    tp = np.diag(cm)[:21]
    assert (total[:, 0] == tp).all()
    assert (total[:, 1] == cm[:, :21].sum(axis=0) - tp).all()
    assert (total[:, 2] == cm[:21].sum(axis=1) - tp).all()
