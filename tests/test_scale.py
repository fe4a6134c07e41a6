"""count_totals: the full-split IoU aggregation kept as totals must equal the per-image one.

Every case compares ``queries.class_counts`` (totals) with ``queries.class_counts_from_rows``
(the per-image aggregation) and with a reference summed here in Python from the raw rows, after
recording, re-recording, a re-scan and the upgrade of a schema-5 cache. Real DuckDB, no mocks.
"""

from __future__ import annotations

import random

import duckdb
import pytest

from cache import queries, schema
from cache.classes import ClassSet
from cache.db import connect, db_path
from cache.rows import Variant

CLASSES = ClassSet(("background", "cat", "dog", "person"))
MASK = ("/m.png", 3, 3)


def _variant(vid: str, dataset_id: str = "d1") -> Variant:
    return Variant(id=vid, dataset_id=dataset_id, name=vid, method="cam", step="cam", params={}, steps=(),
                   source_id=None, code_version="t", created_at=1.0)


def _image(image_id: str, labels=(1,), problem=None) -> tuple:
    return (image_id, f"/{image_id}.jpg", *MASK, list(labels), problem)


def _record(con, vid: str, counts: list[tuple]) -> None:
    """Record ``counts`` rows (image_id, class_id, tp, fp, fn) with a label map per image."""
    ids = sorted({r[0] for r in counts})
    queries.record_results(con, 1, vid, queries.ResultRows([(i, f"labels/{vid}/{i}.png", None) for i in ids],
                                                           counts, []))


def reference(con, dataset_id: str, split: str) -> list[dict]:
    """class_counts summed in Python from the raw images, variants and counts rows."""
    usable = {i for (i,) in con.execute(
        "SELECT image_id FROM images WHERE dataset_id = ? AND split = ? AND problem IS NULL",
        [dataset_id, split]).fetchall()}
    own = {v for (v,) in con.execute("SELECT id FROM variants WHERE dataset_id = ?", [dataset_id]).fetchall()}
    sums: dict[tuple[str, int], list[int]] = {}
    for vid, image_id, c, tp, fp, fn in con.execute("SELECT * FROM counts").fetchall():
        if vid in own and image_id in usable:
            s = sums.setdefault((vid, c), [0, 0, 0, 0])
            s[0] += tp
            s[1] += fp
            s[2] += fn
            s[3] += tp + fn > 0
    return [{"variant_id": v, "class_id": c, "tp": tp, "fp": fp, "fn": fn, "n_images": n,
             "iou": tp / (tp + fp + fn) if tp + fn > 0 else None}
            for (v, c), (tp, fp, fn, n) in sorted(sums.items())]


def assert_exact(con, dataset_id: str = "d1", splits=("train",)) -> None:
    for split in splits:
        totals = queries.class_counts(con, dataset_id, split)
        assert totals == queries.class_counts_from_rows(con, dataset_id, split) == reference(con, dataset_id, split)


def _seed(con) -> None:
    queries.upsert_dataset(con, "d1", "toy", "/toy", CLASSES, "vocdevkit")
    queries.replace_split_images(con, "d1", "train", [_image("a"), _image("b", (1, 2)), _image("c")])
    queries.insert_variant(con, _variant("v1"))


def test_totals_of_a_recorded_split_are_the_sums_worked_out_by_hand(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        # a: bg 4/1/0, cat 3/0/1; b: bg 2/0/1, cat 1/1/0, dog 0/0/2; c: bg 5/0/0
        _record(con, "v1", [("a", 0, 4, 1, 0), ("a", 1, 3, 0, 1), ("b", 0, 2, 0, 1), ("b", 1, 1, 1, 0),
                            ("b", 2, 0, 0, 2), ("c", 0, 5, 0, 0)])
    with connect(tmp_path, read_only=True) as con:
        rows = queries.class_counts(con, "d1", "train")
        assert_exact(con)
    assert rows == [
        {"variant_id": "v1", "class_id": 0, "tp": 11, "fp": 1, "fn": 1, "n_images": 3, "iou": 11 / 13},
        {"variant_id": "v1", "class_id": 1, "tp": 4, "fp": 1, "fn": 1, "n_images": 2, "iou": 4 / 6},
        {"variant_id": "v1", "class_id": 2, "tp": 0, "fp": 0, "fn": 2, "n_images": 1, "iou": 0.0},
    ]


def test_rerecording_an_image_replaces_its_share_of_the_totals(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        _record(con, "v1", [("a", 0, 4, 1, 0), ("a", 1, 3, 0, 1), ("b", 0, 2, 0, 1), ("b", 2, 0, 3, 0)])
        # b again: dog (only on b) is gone, a false positive of person appears
        _record(con, "v1", [("b", 0, 2, 0, 1), ("b", 3, 0, 7, 0)])
        rows = {r["class_id"]: r for r in queries.class_counts(con, "d1", "train")}
        assert_exact(con)
    assert sorted(rows) == [0, 1, 3]  # no row of dog is left, as in the per-image aggregation
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"], rows[0]["n_images"]) == (6, 1, 1, 2)
    assert (rows[3]["tp"], rows[3]["fp"], rows[3]["n_images"], rows[3]["iou"]) == (0, 7, 0, None)


def test_a_rescan_that_drops_or_marks_images_rebuilds_the_split(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        queries.replace_split_images(con, "d1", "val", [_image("a"), _image("c")])  # a and c also in val
        _record(con, "v1", [("a", 1, 3, 0, 1), ("b", 1, 1, 1, 0), ("c", 1, 2, 2, 2)])
        assert_exact(con, splits=("train", "val"))
        # Re-scan of train: b dropped, c now has a problem, d is new (not labelled yet).
        queries.replace_split_images(con, "d1", "train", [_image("a"), _image("c", problem="/c.png: broken"),
                                                          _image("d")])
        train = queries.class_counts(con, "d1", "train")
        assert_exact(con, splits=("train", "val"))
        val = queries.class_counts(con, "d1", "val")
    assert [(r["tp"], r["fp"], r["fn"]) for r in train] == [(3, 0, 1)]  # a only
    assert [(r["tp"], r["fp"], r["fn"]) for r in val] == [(5, 2, 3)]  # a + c: val untouched


def test_totals_do_not_need_the_variant_row_first_and_keep_to_its_dataset(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        queries.upsert_dataset(con, "d2", "copy", "/copy", CLASSES, "vocdevkit")
        queries.replace_split_images(con, "d2", "train", [_image("a"), _image("b")])  # same image ids
        _record(con, "v2", [("a", 1, 1, 0, 0)])  # recorded before its variant row exists
        _record(con, "w", [("a", 1, 9, 0, 0), ("b", 2, 0, 0, 4)])  # a variant of d2
        queries.insert_variant(con, _variant("w", "d2"))
        assert [r["variant_id"] for r in queries.class_counts(con, "d1", "train")] == []
        queries.insert_variant(con, _variant("v2"))
        assert [r["variant_id"] for r in queries.class_counts(con, "d1", "train")] == ["v2"]
        assert [r["variant_id"] for r in queries.class_counts(con, "d2", "train")] == ["w", "w"]
        assert_exact(con, "d1")
        assert_exact(con, "d2")


def test_a_failed_record_leaves_the_totals_as_they_were(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        _record(con, "v1", [("a", 1, 3, 0, 1)])
    with pytest.raises(duckdb.ConstraintException):
        with connect(tmp_path) as con:
            # counts of a without its label map: not replaced, so the same key is a duplicate
            queries.record_results(con, 1, "v1", queries.ResultRows([("b", "labels/v1/b.png", None)],
                                                                    [("b", 1, 5, 0, 0), ("a", 1, 3, 0, 1)], []))
    with connect(tmp_path, read_only=True) as con:
        assert [(r["tp"], r["fn"]) for r in queries.class_counts(con, "d1", "train")] == [(3, 1)]
        assert_exact(con)


def test_random_records_rerecords_and_rescans_keep_the_totals_exact(tmp_path):
    rng = random.Random(7)
    ids = [f"i{k:02d}" for k in range(24)]
    with connect(tmp_path) as con:
        queries.upsert_dataset(con, "d1", "toy", "/toy", CLASSES, "vocdevkit")
        for vid in ("v1", "v2", "v3"):
            queries.insert_variant(con, _variant(vid))
        queries.replace_split_images(con, "d1", "val", [_image(i) for i in ids[:8]])
        for step in range(40):
            if step % 10 == 9:  # a re-scan of train: some images dropped, some with a problem
                rows = [_image(i, problem="bad" if rng.random() < 0.2 else None) for i in ids if rng.random() < 0.8]
                queries.replace_split_images(con, "d1", "train", rows)
            else:
                batch = rng.sample(ids, rng.randint(1, 6))
                counts = [(i, c, rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9))
                          for i in batch for c in rng.sample(range(4), rng.randint(1, 3))]
                _record(con, rng.choice(("v1", "v2", "v3")), [r for r in counts if sum(r[2:]) > 0])
            assert_exact(con, splits=("train", "val"))


def test_a_schema_5_cache_gets_its_totals_built_once_on_upgrade(tmp_path):
    # A cache as code of schema 5 left it: no count_totals table, counts already there.
    old = duckdb.connect(str(db_path(tmp_path)))
    for statement in schema.STATEMENTS:
        if "count_totals" not in statement:
            old.execute(statement)
    old.execute("INSERT INTO meta VALUES ('schema_version', '5')")
    old.execute("INSERT INTO datasets (id, name, root) VALUES ('d1', 'toy', '/toy')")
    old.execute("""INSERT INTO images VALUES ('d1', 'train', 'a', '/a.jpg', '/a.png', 3, 3, [1], NULL),
                                            ('d1', 'train', 'b', '/b.jpg', '/b.png', 3, 3, [1], NULL),
                                            ('d1', 'train', 'c', '/c.jpg', '/c.png', 3, 3, [1], 'broken')""")
    old.execute("""INSERT INTO variants VALUES ('v1', 'd1', 'CAM', 'cam', 'cam', '{}', '[]', NULL, 't', 1.0)""")
    old.execute("""INSERT INTO counts VALUES ('v1', 'a', 0, 5, 1, 0), ('v1', 'a', 1, 3, 0, 1),
                                            ('v1', 'b', 1, 2, 2, 0), ('v1', 'c', 1, 9, 9, 9)""")
    old.close()
    with connect(tmp_path, read_only=True) as con:  # the first reader upgrades (a writer, once)
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(schema.SCHEMA_VERSION),)
        rows = queries.class_counts(con, "d1", "train")
        assert_exact(con)
    assert [(r["class_id"], r["tp"], r["fp"], r["fn"], r["n_images"]) for r in rows] == [(0, 5, 1, 0, 1),
                                                                                         (1, 5, 2, 1, 2)]
    # Once: a later upgrade check leaves the totals alone (a hand-made change to them survives).
    with connect(tmp_path) as con:
        con.execute("UPDATE count_totals SET tp = tp + 100 WHERE class_id = 1")
    with connect(tmp_path) as con:
        schema.ensure_schema(con)
        assert con.execute("SELECT tp FROM count_totals WHERE class_id = 1").fetchone() == (105,)


# --- sweep_totals: the threshold sweep of the whole split, kept as count_totals are ----------


def _record_sweep(con, vid: str, rows: list[tuple]) -> None:
    """Record sweep rows (image_id, threshold, class_id, tp, fp, fn, fp_bg) with a label map per image."""
    ids = sorted({r[0] for r in rows})
    queries.record_results(con, 1, vid, queries.ResultRows([(i, f"labels/{vid}/{i}.png", None) for i in ids],
                                                           [], [], sweep=rows))


def sweep_reference(con, dataset_id: str, split: str, vid: str) -> list[dict]:
    """sweep_sums summed in Python from the raw images and sweep_counts rows."""
    usable = {i for (i,) in con.execute(
        "SELECT image_id FROM images WHERE dataset_id = ? AND split = ? AND problem IS NULL",
        [dataset_id, split]).fetchall()}
    sums: dict[tuple[float, int], list[int]] = {}
    for v, image_id, t, c, tp, fp, fn, fp_bg in con.execute("SELECT * FROM sweep_counts").fetchall():
        if v == vid and image_id in usable:
            s = sums.setdefault((t, c), [0, 0, 0, 0, 0])
            for k, value in enumerate((tp, fp, fn, fp_bg, tp + fn > 0)):
                s[k] += value
    return [{"threshold": t, "class_id": c, "tp": tp, "fp": fp, "fn": fn, "fp_bg": b, "n_images": n}
            for (t, c), (tp, fp, fn, b, n) in sorted(sums.items())]


def assert_sweep_exact(con, vids=("v1",), splits=("train",)) -> None:
    for split in splits:
        usable = queries.usable_image_ids(con, "d1", split)
        for vid in vids:
            totals = queries.sweep_sums(con, "d1", split, vid)
            assert totals == queries.sweep_sums(con, "d1", split, vid, usable) == sweep_reference(con, "d1", split, vid)


def test_sweep_totals_follow_records_rerecords_and_rescans(tmp_path):
    rng = random.Random(11)
    ids = [f"i{k:02d}" for k in range(20)]
    with connect(tmp_path) as con:
        queries.upsert_dataset(con, "d1", "toy", "/toy", CLASSES, "vocdevkit")
        for vid in ("v1", "v2"):
            queries.insert_variant(con, _variant(vid))
        queries.replace_split_images(con, "d1", "val", [_image(i) for i in ids[:6]])
        for step in range(30):
            if step % 10 == 9:
                rows = [_image(i, problem="bad" if rng.random() < 0.2 else None) for i in ids if rng.random() < 0.8]
                queries.replace_split_images(con, "d1", "train", rows)
            else:
                batch = rng.sample(ids, rng.randint(1, 5))
                sweep = [(i, t, c, rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 3))
                         for i in batch for t in (0.1, 0.2, 0.3) for c in rng.sample(range(4), rng.randint(1, 3))]
                _record_sweep(con, rng.choice(("v1", "v2")), [r for r in sweep if sum(r[3:6]) > 0])
            assert_sweep_exact(con, ("v1", "v2"), ("train", "val"))


def test_a_schema_8_cache_gets_its_sweep_totals_built_on_upgrade(tmp_path):
    with connect(tmp_path) as con:
        _seed(con)
        _record_sweep(con, "v1", [("a", 0.1, 0, 4, 1, 0, 0), ("a", 0.1, 1, 3, 0, 1, 0), ("b", 0.1, 1, 1, 2, 0, 2),
                                  ("a", 0.2, 0, 5, 0, 0, 0), ("a", 0.2, 1, 2, 0, 2, 0), ("b", 0.2, 1, 1, 0, 0, 0)])
        con.execute("DROP TABLE sweep_totals")  # as code of schema 8 left it
        con.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")
    with connect(tmp_path) as con:
        schema.ensure_schema(con)
        rows = queries.sweep_sums(con, "d1", "train", "v1")
        assert_sweep_exact(con)
    assert [(r["threshold"], r["class_id"], r["tp"], r["fp"], r["fn"], r["fp_bg"], r["n_images"]) for r in rows] == [
        (0.1, 0, 4, 1, 0, 0, 1), (0.1, 1, 4, 2, 1, 2, 2), (0.2, 0, 5, 0, 0, 0, 1), (0.2, 1, 3, 0, 2, 0, 2)]
