"""The DuckDB cache: schema, the IoU aggregation, and reading while another process writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np

from cache import queries, reports
from cache.classes import VOC
from cache.db import connect
from cache.rows import Variant
from tests.conftest import REPO


def _seed(con, dataset_id="d1"):
    queries.upsert_dataset(con, dataset_id, "toy", "/toy", VOC, "vocdevkit")
    rows = [("a", "/a.jpg", "/a.png", 3, 3, [8], None), ("b", "/b.jpg", "/b.png", 3, 3, [8, 12], None),
            ("c", "/c.jpg", None, 0, 0, [], "/c.png: mask file is missing")]
    queries.replace_split_images(con, dataset_id, "train", rows)
    queries.insert_variant(con, Variant(id="v1", dataset_id=dataset_id, name="CAM", method="cam", step="cam",
                                        params={}, steps=(), source_id=None, code_version="t", created_at=1.0))


def test_iou_table_is_one_aggregation_over_counts(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        queries.record_results(con, 1, "v1", queries.ResultRows(
            label_maps=[("a", "labels/v1/a.png", None), ("b", "labels/v1/b.png", None)],
            # a: bg TP4 FP1 FN0, cat TP3 FP0 FN1;  b: bg 2/0/1, cat 1/1/0, dog 0/0/2
            counts=[("a", 0, 4, 1, 0), ("a", 8, 3, 0, 1), ("b", 0, 2, 0, 1), ("b", 8, 1, 1, 0), ("b", 12, 0, 0, 2)],
            errors=[]))
    with connect(tmp_path, read_only=True) as con:
        table = reports.iou_table(con, "d1", "train")
        assert queries.class_image_counts(con, "d1", "train") == {0: 2, 8: 2, 12: 1}
    assert table.names == ["CAM"] and table.labelled.tolist() == [2]
    assert table.iou[0, 0] == 6 / 8
    assert table.iou[0, 8] == 4 / 6
    assert table.iou[0, 12] == 0
    assert table.n_images[0, 8] == 2 and table.n_images[0, 12] == 1
    assert np.isnan(table.iou[0, 1])  # no aeroplane image: empty, not 0
    assert np.isclose(table.miou[0], (6 / 8 + 4 / 6 + 0) / 3)


def test_rerecording_an_image_replaces_its_counts(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        for tp in (1, 5):
            queries.record_results(con, 1, "v1", queries.ResultRows(
                [("a", "labels/v1/a.png", None)], [("a", 8, tp, 0, 0)], []))
        assert con.execute("SELECT sum(tp) FROM counts").fetchone()[0] == 5
        assert con.execute("SELECT count(*) FROM label_maps").fetchone()[0] == 1


def test_failed_write_rolls_back(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
    try:
        with connect(tmp_path) as con:
            queries.insert_variant(con, Variant(id="v2", dataset_id="d1", name="X", method="x", step="x",
                                                params={}, steps=(), source_id=None, code_version="t",
                                                created_at=2.0))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with connect(tmp_path, read_only=True) as con:
        assert [v.id for v in queries.variants(con, "d1")] == ["v1"]


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from cache import queries
    from cache.db import connect
    n = int(sys.argv[1])
    for i in range(n):
        with connect({cache!r}) as con:
            queries.record_results(con, 1, "v1", queries.ResultRows(
                [(f"img{{i}}", f"labels/v1/img{{i}}.png", None)], [("a", 8, 1, 0, 0)] if i == 0 else [], []))
            queries.set_progress(con, 1, "label", i + 1, n, 0)
        time.sleep(0.005)
    print("writer done")
""")


def test_reader_and_writer_processes_share_the_file(tmp_path):
    """The app's read path (read-only, retried) and a worker-like writer in another process both
    get through while the other holds the file, and the reader sees the writes arrive."""
    with connect(tmp_path) as con:
        _seed(con)
        queries.insert_job(con, "label", "d1", "v1", "train", None)
        con.execute("UPDATE jobs SET status = 'running'")
    n = 60
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), cache=str(tmp_path)), str(n)],
                              stdout=subprocess.PIPE, text=True)
    seen, reads = [], 0
    while writer.poll() is None:
        with connect(tmp_path, read_only=True) as con:
            seen.append(queries.get_job(con, 1).done)
            reports.iou_table(con, "d1", "train")
        reads += 1
        time.sleep(0.003)
    assert writer.returncode == 0 and "writer done" in writer.stdout.read()
    with connect(tmp_path, read_only=True) as con:
        assert queries.get_job(con, 1).done == n
        assert con.execute("SELECT count(*) FROM label_maps").fetchone()[0] == n
    assert reads > 10, "the reader never got in while the writer ran"
    assert seen == sorted(seen) and len(set(seen)) > 3, "the reader did not see progress arrive"


def test_cached_iou_equals_sklearn_on_the_cached_label_maps(baseline_cache):
    """The heatmap's numbers (SQL over counts) equal an independent computation that decodes the
    worker's label maps and the ground truth and uses scikit-learn's confusion matrix."""
    from PIL import Image
    from sklearn.metrics import confusion_matrix

    from engine.core.chains import dataset_id_for

    cache_dir, root = baseline_cache
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        table = reports.iou_table(con, dataset_id, "train")
        maps = {vid: queries.label_map_rows(con, vid) for vid in table.variant_ids}
    assert len(table.variant_ids) == 2
    for row, variant_id in enumerate(table.variant_ids):
        gts, preds = [], []
        for image_id, (path, _) in sorted(maps[variant_id].items()):
            gts.append(np.array(Image.open(root / "SegmentationClassAug" / f"{image_id}.png")).ravel())
            preds.append(np.array(Image.open(cache_dir / path)).ravel())
        gt, pred = np.concatenate(gts), np.concatenate(preds)
        keep = gt != 255
        cm = confusion_matrix(gt[keep], pred[keep], labels=[*range(21), 255])[:21]
        tp = np.diag(cm[:, :21])
        union = cm.sum(axis=1) + cm[:, :21].sum(axis=0) - tp
        present = cm.sum(axis=1) > 0
        expected = np.where(present, tp / np.maximum(union, 1), np.nan)
        assert np.allclose(table.iou[row], expected, equal_nan=True)
        assert np.isclose(table.miou[row], np.nanmean(expected))
