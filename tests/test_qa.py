"""Pseudo-label QA: find_images' sorts, filters and paging against numpy over the decoded label
maps of a small real cache; flags; thumbnails on disk; the QA page's overlays and legend."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache import qa, queries
from cache.classes import VOC
from cache.db import connect
from cache.labelmaps import write_label_map
from cache.rows import Variant
from cache.thumbnails import ThumbnailError, image_thumbnail, label_thumbnail
from engine.ops.metrics import confusion_counts
from tests.conftest import _split_ids
from ui.overlays import legend, overlay, score_overlay, wipe

BIRD, DOG, PERSON = 3, 12, 15
TRAIN, PROBLEM, VAL = _split_ids("train")[:10], _split_ids("train")[10], _split_ids("val")[:2]
# VOC devkit colours (VOClabelcolormap.m), written out by hand
COLOURS = {0: (0, 0, 0), 9: (192, 0, 0), 12: (64, 0, 128), 15: (192, 128, 128), 255: (224, 224, 192)}


def _mask(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))


def _fg(label: np.ndarray) -> np.ndarray:
    return (label != 0) & (label != 255)


@pytest.fixture(scope="module")
def qa_cache(voc_root, tmp_path_factory) -> Path:
    """10 real train images (plus one with a problem, two val images) and three variants made from
    their masks: "shift" (rolled 9 px right), "recolour" (largest class relabelled bird, a class no
    mask holds; none for the last image) and "merge" (shift's foreground over recolour, the pixels
    where both claim different classes recorded as conflicts)."""
    cache_dir = tmp_path_factory.mktemp("qa") / "cache"
    masks = {i: _mask(voc_root, i) for i in [*TRAIN, PROBLEM, *VAL]}

    def row(i, problem=None):
        return (i, str(voc_root / "JPEGImages" / f"{i}.jpg"), str(voc_root / "SegmentationClassAug" / f"{i}.png"),
                *masks[i].shape, [int(c) for c in np.unique(masks[i]) if 1 <= c <= 20], problem)

    shift = {i: np.roll(masks[i], 9, axis=1) for i in TRAIN}
    recolour = {i: np.where(masks[i] == np.bincount(masks[i][_fg(masks[i])]).argmax(), BIRD, masks[i]).astype(np.uint8)
                for i in TRAIN[:-1]}
    merge = {i: np.where(_fg(shift[i]), shift[i], recolour[i]) for i in recolour}
    with connect(cache_dir) as con:
        queries.upsert_dataset(con, "d1", "animals", str(voc_root), VOC, "vocdevkit")
        queries.replace_split_images(con, "d1", "train", [row(i) for i in TRAIN] + [row(PROBLEM, "x.jpg: corrupt")])
        queries.replace_split_images(con, "d1", "val", [row(i) for i in VAL])
        for n, (vid, maps) in enumerate({"shift": shift, "recolour": recolour, "merge": merge}.items()):
            queries.insert_variant(con, Variant(id=vid, dataset_id="d1", name=f"{vid} name", method=vid, step=vid,
                                                params={}, steps=(), source_id=None, code_version="t",
                                                created_at=float(n)))
            rows = queries.ResultRows([], [], [])
            for i, label in maps.items():
                write_label_map(cache_dir / "labels" / vid / f"{i}.png", label)
                rows.label_maps.append((i, f"labels/{vid}/{i}.png", None))
                rows.counts.extend((i, c, *n3) for c, n3 in enumerate(confusion_counts(masks[i], label, VOC.num_classes).tolist())
                                   if any(n3))
                if vid == "merge":
                    s, r = shift[i], recolour[i]
                    both = _fg(s) & _fg(r) & (s != r)
                    pairs, pixels = np.unique(np.stack([s[both], r[both]]), axis=1, return_counts=True)
                    rows.conflicts.extend((i, int(w), int(lo), int(p)) for (w, lo), p in zip(pairs.T, pixels))
            queries.record_results(con, 1, vid, rows)
    return cache_dir


@pytest.fixture(scope="module")
def decoded(qa_cache, voc_root) -> tuple[dict, dict]:
    """``(masks, {variant: {image_id: label map}})`` decoded from the files on disk."""
    with connect(qa_cache, read_only=True) as con:
        maps = {v: {i: np.asarray(Image.open(qa_cache / p)) for i, (p, _) in queries.label_map_rows(con, v).items()}
                for v in ("shift", "recolour", "merge")}
    return {i: _mask(voc_root, i) for i in TRAIN}, maps


def _per_class(gt: np.ndarray, pred: np.ndarray):
    """tp, fp, fn per class 0-20 over the pixels whose ground truth is not 255."""
    valid = gt != 255
    conf = np.bincount(gt[valid].astype(np.int64) * 256 + pred[valid], minlength=21 * 256).reshape(21, 256)
    tp = np.diag(conf[:, :21])
    return tp, conf[:, :21].sum(axis=0) - tp, conf.sum(axis=1) - tp


def _iou(gt, pred):  # (21,) NaN where neither has the class
    tp, fp, fn = _per_class(gt, pred)
    return np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), np.nan)


def _value(sort, v, o, c, gt, maps, i):
    """The sort key of image ``i`` worked out from the arrays; None when the key leaves it out."""
    pred = maps[v][i]
    tp, fp, fn = _per_class(gt, pred)
    has = tp + fp + fn > 0  # the classes ``counts`` holds a row for
    if sort == "iou":
        return np.nanmean(_iou(gt, pred)) if c is None else (_iou(gt, pred)[c] if has[c] else None)
    if sort == "errors":
        return ((gt != 255) & (pred != gt)).sum() if c is None else (fp[c] + fn[c] if has[c] else None)
    if sort == "disagreement":  # per class |TP_a - TP_b| + |FP_a - FP_b|, halved over all classes
        tp2, fp2, fn2 = _per_class(gt, maps[o][i])
        per_class = np.abs(tp - tp2) + np.abs(fp - fp2)
        if c is None:
            return per_class.sum() / 2 / gt.size
        return per_class[c] / gt.size if has[c] or tp2[c] + fp2[c] + fn2[c] else None
    if sort == "gain":
        gain, mean_gain = _iou(gt, maps[o][i]) - _iou(gt, pred), np.nanmean(_iou(gt, maps[o][i])) - np.nanmean(_iou(gt, pred))
        return mean_gain if c is None else (gain[c] if tp[c] + fn[c] else None)
    s, r = maps["shift"][i], maps["recolour"][i]  # conflicts of "merge": both claim a class, differently
    both = _fg(s) & _fg(r) & (s != r) & (True if c is None else (s == c) | (r == c))
    return int(both.sum()) or None


def _expected(decoded, sort, v, o=None, c=None, descending=None):
    """``[(image_id, value)]`` in the order the sort asks for (ties: image id)."""
    masks, maps = decoded
    found = [(i, _value(sort, v, o, c, masks[i], maps, i)) for i in TRAIN if i in maps[v] and (o is None or i in maps[o])]
    sign = -1 if (qa.DESCENDING[sort] if descending is None else descending) else 1
    return sorted([(i, x) for i, x in found if x is not None], key=lambda r: (sign * round(float(r[1]), 12), r[0]))


# Bird is predicted by "recolour" only: its counts rows have no partner in the other variant's.
@pytest.mark.parametrize("sort, variant, other, class_id", [
    ("iou", "shift", None, None), ("iou", "recolour", None, PERSON), ("errors", "shift", None, None),
    ("errors", "recolour", None, DOG), ("disagreement", "shift", "recolour", None),
    ("disagreement", "recolour", "shift", None), ("disagreement", "shift", "recolour", PERSON),
    ("disagreement", "shift", "recolour", BIRD), ("gain", "shift", "recolour", None),
    ("gain", "recolour", "shift", PERSON), ("conflicts", "merge", None, None), ("conflicts", "merge", None, DOG)])
def test_every_sort_orders_images_by_the_key_computed_from_the_label_maps(qa_cache, decoded, sort, variant,
                                                                          other, class_id):
    query = qa.ImageQuery("train", variant=variant, other=other, class_id=class_id, sort=sort)
    with connect(qa_cache, read_only=True) as con:
        page = qa.find_images(con, "d1", query, limit=100)
    expected = _expected(decoded, sort, variant, other, class_id)
    assert len(expected) >= 2 and page.total == len(expected)
    assert [r["image_id"] for r in page.rows] == [i for i, _ in expected]
    assert [r["value"] for r in page.rows] == pytest.approx([float(x) for _, x in expected])
    if sort == "disagreement":  # a lower bound on the pixels the two label differently
        masks, maps = decoded
        for r in page.rows:
            a, b, valid = maps[variant][r["image_id"]], maps[other][r["image_id"]], masks[r["image_id"]] != 255
            differ = a != b if class_id is None else (a == class_id) != (b == class_id)
            assert r["value"] <= (differ & valid).mean() + 1e-12


def test_filters_by_class_and_variant_leave_out_the_images_they_should(qa_cache, decoded):
    masks, _ = decoded
    with connect(qa_cache, read_only=True) as con:
        def ids(**kwargs):
            page = qa.find_images(con, "d1", qa.ImageQuery("train", **kwargs), limit=100)
            assert page.total == len(page.rows)
            return [r["image_id"] for r in page.rows], page.rows
        every, rows = ids()
        assert every == sorted(TRAIN)  # PROBLEM is listed in train but has a problem
        for r in rows:
            mask = masks[r["image_id"]]
            assert r["labels"] == [c for c in np.unique(mask).tolist() if 1 <= c <= 20]
            assert (r["height"], r["width"]) == mask.shape and r["value"] is None and r["flags"] == []
            assert Path(r["image_path"]).name == f"{r['image_id']}.jpg"
            assert Image.open(r["mask_path"]).size == mask.shape[::-1]
        for classes in [(DOG,), (DOG, PERSON), (8,), (BIRD,)]:
            assert ids(classes=classes)[0] == sorted(i for i in TRAIN if set(classes) <= set(np.unique(masks[i]).tolist()))
        assert ids(variant="recolour")[0] == ids(variant="shift", other="recolour")[0] == sorted(TRAIN[:-1])
        assert ids(variant="shift")[0] == every


def test_pages_cover_the_order_and_an_offset_past_the_end_keeps_the_total(qa_cache, decoded):
    query = qa.ImageQuery("train", variant="shift", sort="errors")
    with connect(qa_cache, read_only=True) as con:
        pages = [qa.find_images(con, "d1", query, limit=4, offset=k) for k in (0, 4, 8, 12)]
        by_class = qa.ImageQuery("train", classes=(DOG,), variant="shift", class_id=DOG, sort="iou")
        past = qa.find_images(con, "d1", by_class, limit=4, offset=50)
        ascending = qa.find_images(con, "d1", qa.ImageQuery("train", variant="shift", sort="errors", descending=False),
                                   limit=100)
    assert [p.total for p in pages] == [10, 10, 10, 10] and [len(p.rows) for p in pages] == [4, 4, 2, 0]
    assert [r["image_id"] for p in pages for r in p.rows] == [i for i, _ in _expected(decoded, "errors", "shift")]
    assert past.rows == [] and past.total == sum(DOG in np.unique(decoded[0][i]) for i in TRAIN) == 4
    assert [r["image_id"] for r in ascending.rows] == [i for i, _ in _expected(decoded, "errors", "shift",
                                                                                descending=False)]


@pytest.mark.parametrize("kwargs, message", [
    ({"sort": "iou"}, "needs a variant"), ({"sort": "gain", "variant": "shift"}, "needs a second variant"),
    ({"sort": "conflicts"}, "needs a variant"), ({"sort": "size"}, "unknown sort 'size'"),
    ({"flagged": "starred"}, "unknown flag filter 'starred'")])
def test_a_bad_query_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qa.ImageQuery("train", **kwargs)


def test_flags_are_listed_filtered_replaced_and_removed(qa_cache, tmp_path):
    cache_dir, a, b = Path(shutil.copytree(qa_cache, tmp_path / "cache")), TRAIN[2], TRAIN[5]
    with connect(cache_dir) as con:
        qa.set_flag(con, "d1", a, "wrong_gt", note="border too wide")
        qa.set_flag(con, "d1", b, "hard_case")
        qa.set_flag(con, "d1", VAL[0], "method_failure", variant_id="recolour")
        qa.set_flag(con, "d1", a, "method_failure")
        qa.set_flag(con, "d1", a, "wrong_gt", note="dog cut off", variant_id="shift")  # replaces the first
        with pytest.raises(ValueError, match="unknown flag kind 'typo'"):
            qa.set_flag(con, "d1", a, "typo")
        with pytest.raises(KeyError, match="'2099_000001' is not in dataset d1"):
            qa.set_flag(con, "d1", "2099_000001", "hard_case")
        with pytest.raises(KeyError, match="not in dataset d2"):
            qa.set_flag(con, "d2", a, "hard_case")
    with connect(cache_dir, read_only=True) as con:
        listed = qa.flags(con, "d1")
        pages = {f: qa.find_images(con, "d1", qa.ImageQuery("train", flagged=f), limit=100)
                 for f in ("any", "flagged", "unflagged", "hard_case", "wrong_gt")}
        past = qa.find_images(con, "d1", qa.ImageQuery("train", flagged="unflagged"), offset=30)
        assert qa.flagged_ids(con, "d1") == sorted([a, b, VAL[0]])
        assert qa.flagged_ids(con, "d1", ["wrong_gt", "hard_case"]) == sorted([a, b])
        assert [f["image_id"] for f in qa.flags(con, "d1", ["method_failure"])] == [a, VAL[0]]
    assert [(f["image_id"], f["kind"]) for f in listed] == [(a, "wrong_gt"), (a, "method_failure"),
                                                           (VAL[0], "method_failure"), (b, "hard_case")]
    assert [listed[0][k] for k in ("note", "variant_name", "splits")] == ["dog cut off", "shift name", ["train"]]
    assert (listed[2]["splits"], listed[2]["variant_name"], listed[1]["variant_name"]) == (["val"], "recolour name", None)
    ids = {f: [r["image_id"] for r in p.rows] for f, p in pages.items()}
    assert ids["flagged"] == sorted([a, b]) and ids["hard_case"] == [b] and ids["wrong_gt"] == [a]
    assert ids["unflagged"] == sorted(set(TRAIN) - {a, b}) and ids["any"] == sorted(TRAIN)
    assert next(r["flags"] for r in pages["any"].rows if r["image_id"] == a) == ["method_failure", "wrong_gt"]
    assert past.rows == [] and past.total == 8
    with connect(cache_dir) as con:
        qa.remove_flag(con, "d1", a, "wrong_gt")
        assert qa.flagged_ids(con, "d1", ["wrong_gt"]) == [] and qa.flagged_ids(con, "d1") == sorted([a, b, VAL[0]])


# --- thumbnails ------------------------------------------------------------------------------


THUMBNAIL = {"image": image_thumbnail, "label": label_thumbnail}


def _source(root: Path, kind: str) -> Path:
    return root / "JPEGImages" / f"{TRAIN[0]}.jpg" if kind == "image" else root / "SegmentationClassAug" / f"{TRAIN[0]}.png"


def _thumb_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "thumbs").rglob("*") if p.is_file())


def _spoil_keeping_stat(path: Path) -> None:
    """Overwrite ``path`` with zeros of the same size and restore its mtime: decoding it fails, a
    cache keyed on (path, mtime, size) still sees the old file."""
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_image_thumbnail_shrinks_the_longer_side_and_a_hit_does_not_decode_the_source(voc_root, tmp_path):
    source = Path(shutil.copy(voc_root / "JPEGImages" / f"{TRAIN[2]}.jpg", tmp_path))  # 375 x 500 (W x H)
    first = image_thumbnail(tmp_path / "c", source, 64)
    assert first.shape == (64, 48, 3) and first.dtype == np.uint8  # 375 * 64 / 500 = 48
    reference = np.asarray(Image.open(source).convert("RGB").resize((48, 64), Image.Resampling.LANCZOS), np.float32)
    assert np.abs(first - reference).mean() < 4  # the same picture, not a crop or another image
    _spoil_keeping_stat(source)
    hit = image_thumbnail(tmp_path / "c", source, 64)
    [cached] = _thumb_files(tmp_path / "c")
    assert np.array_equal(hit, np.asarray(Image.open(cached).convert("RGB")))
    assert np.abs(hit.astype(np.float32) - first).mean() < 6  # JPEG at quality 88


def test_image_thumbnail_is_the_same_on_a_miss_and_on_a_hit(voc_root, tmp_path):
    source = _source(voc_root, "image")
    np.testing.assert_array_equal(image_thumbnail(tmp_path, source, 64), image_thumbnail(tmp_path, source, 64))


def test_label_thumbnail_samples_nearest_pixels_and_follows_a_rewritten_source(voc_root, tmp_path):
    source = Path(shutil.copy(_source(voc_root, "label"), tmp_path))
    mask = _mask(voc_root, TRAIN[0])  # 375 x 500 (H x W)
    thumb = label_thumbnail(tmp_path / "c", source, 200)
    assert thumb.shape == (150, 200) and thumb.dtype == np.uint8
    rows, cols = ((np.arange(150) + 0.5) * 375 / 150).astype(int), ((np.arange(200) + 0.5) * 500 / 200).astype(int)
    np.testing.assert_array_equal(thumb, mask[np.ix_(rows, cols)])  # pixel centres: no blended value
    _spoil_keeping_stat(source)
    np.testing.assert_array_equal(label_thumbnail(tmp_path / "c", source, 200), thumb)
    write_label_map(source, np.where(mask == DOG, 8, mask).astype(np.uint8))  # the dog re-made as a cat
    again = label_thumbnail(tmp_path / "c", source, 200)
    np.testing.assert_array_equal(again, np.where(thumb == DOG, 8, thumb))
    assert len(_thumb_files(tmp_path / "c")) == 2
    write_label_map(tmp_path / "small.png", mask[:40, :60])
    np.testing.assert_array_equal(label_thumbnail(tmp_path / "c", tmp_path / "small.png", 200), mask[:40, :60])


@pytest.mark.parametrize("make, kind", [("missing", "image"), ("junk", "image"), ("missing", "label"),
                                        ("truncated", "label"), ("rgb", "label")])
def test_a_bad_source_raises_naming_the_file(voc_root, tmp_path, make, kind):
    source = tmp_path / ("bad.jpg" if kind == "image" else "bad.png")
    if make == "junk":
        source.write_bytes(b"not a jpeg" * 50)
    elif make == "truncated":
        data = _source(voc_root, "label").read_bytes()
        source.write_bytes(data[: len(data) // 2])
    elif make == "rgb":
        Image.new("RGB", (8, 6)).save(source)
    with pytest.raises(ThumbnailError, match=f"{tmp_path}/bad\\.(jpg|png)"):
        THUMBNAIL[kind](tmp_path / "c", source, 64)
    assert not (tmp_path / "c" / "thumbs").exists() or _thumb_files(tmp_path / "c") == []


@pytest.mark.parametrize("kind", ["image", "label"])
def test_threads_making_the_same_thumbnail_all_get_it(voc_root, tmp_path, kind):
    errors = []
    for size in range(64, 264):  # a new thumbnail each round; a round takes ~10 ms

        def make(size=size, start=threading.Barrier(4)):
            start.wait()
            try:
                THUMBNAIL[kind](tmp_path, _source(voc_root, kind), size)
            except Exception as exc:
                errors.append(exc)
        threads = [threading.Thread(target=make) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            break
    assert errors == []


# --- overlays --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def picture(voc_root) -> tuple[np.ndarray, np.ndarray]:
    """A real image (375 x 500, chair 9 and dog 12 with 255 borders) and its mask."""
    return np.asarray(Image.open(_source(voc_root, "image")).convert("RGB")), _mask(voc_root, TRAIN[0])


def test_overlay_paints_classes_in_voc_colours_and_leaves_background(picture):
    image, mask = picture
    full = overlay(image, mask, VOC, opacity=1.0)
    assert all((full[mask == value] == colour).all() for value, colour in COLOURS.items() if value != 0)
    blended = overlay(image, mask, VOC, opacity=0.6).astype(np.float32)
    assert (blended[mask == 0] == image[mask == 0]).all()
    assert np.abs(blended[mask == DOG] - (0.4 * image[mask == DOG] + 0.6 * np.array(COLOURS[DOG]))).max() <= 0.501
    np.testing.assert_array_equal(overlay(image, mask, VOC, opacity=0.0), image)
    only_dog = overlay(image, mask, VOC, opacity=1.0, only={DOG})
    assert (only_dog[mask == DOG] == COLOURS[DOG]).all() and (only_dog[mask != DOG] == image[mask != DOG]).all()
    small = overlay(image, np.asarray(Image.fromarray(mask).resize((125, 94), Image.Resampling.NEAREST)), VOC, 1.0)
    assert small.shape == image.shape  # a thumbnail-sized label map is fitted to the image
    assert abs((small == COLOURS[DOG]).all(axis=2).mean() - (mask == DOG).mean()) < 0.01


def test_wipe_puts_a_white_seam_at_the_position(picture):
    image, mask = picture
    left, right = overlay(image, mask, VOC, 1.0), image
    out = wipe(left, right, 0.3)  # 0.3 * 500 = column 150: white columns 149 and 150
    assert (out[:, :149] == left[:, :149]).all() and (out[:, 149:151] == 255).all()
    assert (out[:, 151:] == right[:, 151:]).all()
    assert (wipe(left, right, 0.0)[:, 1:] == right[:, 1:]).all() and (wipe(left, right, 1.0)[:, :-1] == left[:, :-1]).all()
    with pytest.raises(ValueError, match="shapes"):
        wipe(left, right[:, :-1], 0.5)


def test_score_overlay_upsamples_clips_and_colours_with_jet(picture):
    image, _ = picture
    # Plotly's Jet runs from rgb(0, 0, 131) at 0 to rgb(128, 0, 0) at 1; scores outside [0, 1] clip
    low, high = score_overlay(image, np.full((3, 4), -1.0), 1.0), score_overlay(image, np.full((3, 4), 2.0), 1.0)
    assert low.shape == high.shape == image.shape
    assert (low == (0, 0, 131)).all() and (high == (128, 0, 0)).all()
    ramp = score_overlay(image, np.array([[0.0, 1.0], [0.0, 1.0]]), 1.0)
    assert (ramp[:, 0] == (0, 0, 131)).all() and (ramp[:, -1] == (128, 0, 0)).all()
    half = score_overlay(image, np.ones((2, 2)), 0.5).astype(np.float32)
    assert np.abs(half - (0.5 * image + 0.5 * np.array([128, 0, 0]))).max() <= 0.501


def test_legend_counts_pixels_and_iou_per_label_map(picture):
    _, gt = picture
    erased = np.where(gt == 9, 0, gt).astype(np.uint8)  # the chair missed
    person = gt.copy()
    person[:20, :30] = PERSON  # a person where the image has none
    rows = legend(gt, {"erased": erased, "person": person}, VOC)
    assert [(r["class_id"], r["class"], r["colour"]) for r in rows] == [
        (0, "background", "#000000"), (9, "chair", "#c00000"), (12, "dog", "#400080"), (15, "person", "#c08080")]
    for r in rows:
        assert r["ground truth px"] == (gt == r["class_id"]).sum()
        for name, label in (("erased", erased), ("person", person)):
            assert r[f"{name} px"] == ((label == r["class_id"]) & (gt != 255)).sum()
            iou = _iou(gt, label)[r["class_id"]]
            assert r[f"{name} IoU"] == (None if np.isnan(iou) else pytest.approx(iou))
    assert rows[1]["erased IoU"] == 0.0 and rows[3]["erased IoU"] is None and rows[3]["person IoU"] == 0.0
