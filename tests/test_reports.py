"""cache.reports beyond the aggregation: the tree of refinements and the gain over the source."""

from __future__ import annotations

import numpy as np

from cache import queries, reports
from cache.db import connect
from cache.rows import Variant
from cache.classes import VOC

# (id, name, source id, IoU of classes 0, 1, 3) on a split whose images hold classes 0, 1 and 3
# (class 2 has none, so it is NaN everywhere). The table order is the query's (creation time).
ROWS = [
    ("b", "CAM → dCRF", "a", (0.85, 0.10, np.nan)),  # a class the variant has not met yet: NaN
    ("d", "TKP", None, (0.50, 0.50, 0.50)),
    ("a", "CAM", None, (0.80, 0.20, 0.20)),
    ("c", "CAM → dCRF → dCRF", "b", (0.90, 0.40, 0.50)),
    ("e", "CAM → SVM", "a", (0.70, 0.30, 0.20)),
    ("f", "Imported → dCRF", "gone", (0.10, 0.10, 0.10)),  # its source has no label map here
]
A, B, C, D, E, F = 2, 0, 3, 1, 4, 5  # row indices


def _table(rows=ROWS) -> reports.IoUTable:
    iou = np.full((len(rows), VOC.num_classes), np.nan)
    iou[:, [0, 1, 3]] = [r[3] for r in rows]
    zeros = np.zeros(iou.shape, np.int64)
    return reports.IoUTable(
        classes=VOC, variant_ids=[r[0] for r in rows], names=[r[1] for r in rows], source_ids=[r[2] for r in rows],
        labelled=np.full(len(rows), 8), with_truth=np.full(len(rows), 8), iou=iou, tp=zeros, fp=zeros, fn=zeros,
        n_images=np.where(np.isfinite(iou), 1, 0), miou=np.nanmean(iou, axis=1),
    )


def test_tree_order_puts_each_refinement_under_its_source():
    order, depths = reports.tree_order(_table())
    # Roots TKP, CAM, Imported → dCRF in table order; CAM's children by name ("S" < "d").
    assert order == [D, A, E, B, C, F]
    assert depths == [0, 0, 1, 1, 2, 0]


def test_tree_order_of_a_flat_table_is_the_table():
    rows = [(vid, name, None, iou) for vid, name, _, iou in ROWS]
    assert reports.tree_order(_table(rows)) == (list(range(6)), [0] * 6)


def test_gain_is_refined_minus_source_per_class():
    gain = reports.gain_table(_table())
    assert gain.rows.tolist() == [E, B, C] and gain.sources.tolist() == [A, A, B]
    expected = [(-0.10, 0.10, 0.0),  # CAM → SVM vs CAM
                (0.05, -0.10, np.nan),  # CAM → dCRF vs CAM: class 3 not met by the refinement yet
                (0.05, 0.30, np.nan)]  # CAM → dCRF → dCRF vs CAM → dCRF: class 3 not met by the source
    assert np.allclose(gain.gain[:, [0, 1, 3]], expected, equal_nan=True)
    assert np.isnan(gain.gain[:, [2, *range(4, VOC.num_classes)]]).all()  # no images: no gain, not 0
    # mIoU: SVM 0.4 vs CAM 0.4; dCRF (0.85 + 0.10) / 2 = 0.475 vs 0.4; dCRF → dCRF 0.6 vs 0.475
    assert np.allclose(gain.miou_gain, [0.0, 0.075, 0.125])


def test_gain_of_a_table_without_refinements_is_empty():
    gain = reports.gain_table(_table(ROWS[1:3]))  # TKP and CAM
    assert gain.rows.tolist() == [] and gain.gain.shape == (0, VOC.num_classes) and gain.miou_gain.shape == (0,)


def test_iou_table_carries_the_source_of_each_variant(tmp_path):
    with connect(tmp_path) as con:
        queries.upsert_dataset(con, "d1", "toy", "/toy", VOC, "vocdevkit")
        queries.replace_split_images(con, "d1", "train", [("a", "/a.jpg", "/a.png", 3, 3, [8], None)])
        for vid, name, source, created in [("v1", "CAM", None, 1.0), ("v2", "CAM → dCRF", "v1", 2.0)]:
            queries.insert_variant(con, Variant(id=vid, dataset_id="d1", name=name, method="cam",
                                                step="cam" if source is None else "dcrf", params={}, steps=(),
                                                source_id=source, code_version="t", created_at=created))
            # cat: CAM TP 2 FP 2 FN 0 (IoU 1/2), the refinement TP 3 FP 0 FN 1 (IoU 3/4)
            tp, fp, fn = (2, 2, 0) if source is None else (3, 0, 1)
            queries.record_results(con, 1, vid, queries.ResultRows(
                [("a", f"labels/{vid}/a.png", None)], [("a", 8, tp, fp, fn)], []))
    with connect(tmp_path, read_only=True) as con:
        table = reports.iou_table(con, "d1", "train")
    assert table.variant_ids == ["v1", "v2"] and table.source_ids == [None, "v1"]
    gain = reports.gain_table(table)
    assert gain.rows.tolist() == [1] and gain.sources.tolist() == [0]
    assert np.isclose(gain.gain[0, 8], 3 / 4 - 1 / 2) and np.isclose(gain.miou_gain[0], 1 / 4)
