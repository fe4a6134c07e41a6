"""engine/core/dataset.py on copies of real VOC images, each broken in one known way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.core.dataset import (
    DatasetError,
    default_voc_root,
    image_labels,
    list_splits,
    mask_values,
    open_layout,
    read_image,
    read_mask,
    scan_split,
    to_item,
)
from cache.classes import VOC
from engine.core.layouts import read_split_ids as read_list
from engine.core.types import ImageError


def read_split_ids(root: Path, split: str) -> list[str]:
    return read_list(open_layout(root).split(split))


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _by_id(records):
    return {r.image_id: r for r in records}


def _independent_labels(mask_png: Path) -> tuple[int, ...]:
    values = np.unique(np.array(Image.open(mask_png)))
    return tuple(int(v) for v in values if 0 < v < 21)


# --- hand-worked cases -------------------------------------------------------------------------


def test_image_labels_by_hand():
    mask = np.array([[0, 0, 255], [8, 8, 255], [0, 15, 15]], dtype=np.uint8)
    assert image_labels(mask, VOC) == (8, 15)
    assert image_labels(np.zeros((2, 2), np.uint8), VOC) == ()
    assert image_labels(np.full((2, 2), 255, np.uint8), VOC) == ()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        image_labels(np.zeros((2, 2, 3), np.uint8), VOC)


def test_default_root_is_bundled_data_or_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ISLE_VOC_ROOT", raising=False)
    root = default_voc_root()
    assert root.is_absolute() and root.name == "voc2012-animals"
    assert (root / "JPEGImages").is_dir()
    monkeypatch.setenv("ISLE_VOC_ROOT", str(tmp_path))
    assert default_voc_root() == tmp_path


# --- the clean copy ----------------------------------------------------------------------------


def test_scan_gives_real_sizes_and_labels(tiny_voc):
    assert list_splits(tiny_voc) == ["train", "val"]
    records = scan_split(tiny_voc, "train")
    assert [r.image_id for r in records] == _ids(tiny_voc, "train")
    for r in records:
        assert r.problem is None, r.problem
        with Image.open(r.image_path) as im:
            assert (r.width, r.height) == im.size
        assert r.labels == _independent_labels(r.mask_path)
        assert r.labels, f"{r.image_id}: every bundled image shows at least one object"
        item = to_item(r)
        assert (item.image_id, item.labels, item.height, item.width) == (r.image_id, r.labels, r.height, r.width)


def test_parallel_scan_matches_serial_on_real_val(voc_root):
    serial = scan_split(voc_root, "val", processes=1)
    parallel = scan_split(voc_root, "val", processes=2)  # 259 images: uses worker processes
    assert len(serial) == 259
    assert parallel == serial
    assert all(r.problem is None for r in serial)


def test_read_image_and_mask_of_real_files(tiny_voc):
    image_id = _ids(tiny_voc, "val")[0]
    rgb = read_image(tiny_voc / "JPEGImages" / f"{image_id}.jpg")
    mask = read_mask(tiny_voc / "SegmentationClassAug" / f"{image_id}.png", expected_hw=rgb.shape[:2])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert mask.dtype == np.uint8 and mask.shape == rgb.shape[:2]
    with Image.open(tiny_voc / "JPEGImages" / f"{image_id}.jpg") as im:
        assert np.array_equal(rgb, np.asarray(im.convert("RGB")))


# --- one broken file per case: a clear problem naming it, the others stay valid --------------


def _scan_with_one_bad(root: Path, break_it) -> tuple[str, str]:
    """Break the first train image with ``break_it(image_id)``; return (id, problem)."""
    ids = _ids(root, "train")
    bad_id = ids[0]
    break_it(bad_id)
    records = _by_id(scan_split(root, "train"))
    assert len(records) == len(ids)
    others = [records[i] for i in ids[1:]]
    assert all(r.problem is None for r in others), [r.problem for r in others if r.problem]
    assert records[bad_id].problem is not None
    assert records[bad_id].labels == ()
    with pytest.raises(ValueError, match=bad_id):
        to_item(records[bad_id])
    return bad_id, records[bad_id].problem


def test_truncated_jpeg(tiny_voc):
    def truncate(image_id):
        path = tiny_voc / "JPEGImages" / f"{image_id}.jpg"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    bad_id, problem = _scan_with_one_bad(tiny_voc, truncate)
    assert f"JPEGImages/{bad_id}.jpg" in problem and "truncated" in problem
    with pytest.raises(ImageError, match=rf"{bad_id}\.jpg.*truncated"):
        read_image(tiny_voc / "JPEGImages" / f"{bad_id}.jpg")


def test_garbage_jpeg(tiny_voc):
    def garbage(image_id):
        (tiny_voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(np.random.default_rng(0).bytes(5000))

    bad_id, problem = _scan_with_one_bad(tiny_voc, garbage)
    assert f"JPEGImages/{bad_id}.jpg" in problem and "cannot decode image" in problem
    with pytest.raises(ImageError, match=rf"{bad_id}\.jpg: cannot decode image"):
        read_image(tiny_voc / "JPEGImages" / f"{bad_id}.jpg")


def test_missing_image(tiny_voc):
    bad_id, problem = _scan_with_one_bad(tiny_voc, lambda i: (tiny_voc / "JPEGImages" / f"{i}.jpg").unlink())
    assert problem == f"{tiny_voc / 'JPEGImages' / f'{bad_id}.jpg'}: image file is missing"
    with pytest.raises(ImageError, match="image file is missing"):
        read_image(tiny_voc / "JPEGImages" / f"{bad_id}.jpg")


def test_missing_mask(tiny_voc):
    bad_id, problem = _scan_with_one_bad(
        tiny_voc, lambda i: (tiny_voc / "SegmentationClassAug" / f"{i}.png").unlink()
    )
    assert problem == f"{tiny_voc / 'SegmentationClassAug' / f'{bad_id}.png'}: mask file is missing"
    assert _by_id(scan_split(tiny_voc, "train"))[bad_id].mask_path is None


def test_mask_of_wrong_size(tiny_voc):
    def shrink(image_id):
        path = tiny_voc / "SegmentationClassAug" / f"{image_id}.png"
        with Image.open(path) as im:
            small = im.resize((im.width // 2, im.height // 2), Image.NEAREST)
        small.save(path)

    bad_id, problem = _scan_with_one_bad(tiny_voc, shrink)
    with Image.open(tiny_voc / "JPEGImages" / f"{bad_id}.jpg") as im:
        w, h = im.size
    assert f"SegmentationClassAug/{bad_id}.png" in problem
    assert f"mask is {w // 2}x{h // 2} (WxH) but the image is {w}x{h}" in problem
    with pytest.raises(ImageError, match="but the image is"):
        read_mask(tiny_voc / "SegmentationClassAug" / f"{bad_id}.png", expected_hw=(h, w))


def test_mask_with_unknown_value(tiny_voc):
    def write_42(image_id):
        path = tiny_voc / "SegmentationClassAug" / f"{image_id}.png"
        with Image.open(path) as im:
            palette = im.getpalette()
            values = np.array(im)
        values[:5, :5] = 42
        out = Image.fromarray(values, mode="P")
        out.putpalette(palette)
        out.save(path)

    bad_id, problem = _scan_with_one_bad(tiny_voc, write_42)
    assert f"SegmentationClassAug/{bad_id}.png" in problem
    assert "unknown label values [42]" in problem


def test_mask_not_single_channel(tiny_voc):
    def to_rgb(image_id):
        path = tiny_voc / "SegmentationClassAug" / f"{image_id}.png"
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        rgb.save(path)

    bad_id, problem = _scan_with_one_bad(tiny_voc, to_rgb)
    assert f"SegmentationClassAug/{bad_id}.png" in problem and "single-channel" in problem and "RGB" in problem


def test_read_mask_errors(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: mask file is missing"):
        read_mask(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match=r"junk\.png: cannot decode mask"):
        read_mask(tmp_path / "junk.png")
    Image.fromarray(np.array([[0, 21], [200, 255]], np.uint8), mode="L").save(tmp_path / "bad.png")
    with pytest.raises(ImageError, match=r"bad\.png: unknown label values \[21, 200\] \(valid: 0-20 and 255\)"):
        read_mask(tmp_path / "bad.png", classes=VOC)
    assert read_mask(tmp_path / "bad.png").max() == 255  # no class set: a mask checked when registered
    with pytest.raises(ImageError, match=r"bad\.png: unknown label values \[21, 200\]"):
        mask_values(tmp_path / "bad.png", classes=VOC)
    np.testing.assert_array_equal(mask_values(tmp_path / "bad.png"), [0, 21, 200, 255])


# --- whole-dataset problems --------------------------------------------------------------------


def test_empty_split_list(tiny_voc):
    path = tiny_voc / "ImageSets" / "Segmentation" / "train.txt"
    path.write_text("\n  \n")
    with pytest.raises(DatasetError, match=rf"{path}: split list holds no image ids"):
        read_split_ids(tiny_voc, "train")
    with pytest.raises(DatasetError, match="holds no image ids"):
        scan_split(tiny_voc, "train")


def test_missing_split_file(tiny_voc):
    # A split is one of the layout's lists: asking for another names the valid ones.
    with pytest.raises(DatasetError, match=rf"{tiny_voc}: unknown split 'test'; valid: train, val"):
        scan_split(tiny_voc, "test")
    path = tiny_voc / "ImageSets" / "Segmentation" / "val.txt"
    split = open_layout(tiny_voc).split("val")
    path.unlink()
    with pytest.raises(DatasetError, match=rf"{path}: split list is missing"):
        read_list(split)


def test_a_list_entry_escaping_the_root_is_one_problem_not_a_lost_split(tiny_voc, tmp_path):
    """``../../../etc/passwd`` in a split list: that entry is refused unread with a problem naming
    the list file and line; the other images are scanned and registered by the worker."""
    from cache import queries
    from cache.db import connect
    from engine.core.chains import dataset_id_for
    from engine.runtime.jobs import submit_chain
    from engine.runtime.worker import WorkerConfig, serve

    ids = _ids(tiny_voc, "train")
    path = tiny_voc / "ImageSets" / "Segmentation" / "train.txt"
    path.write_text("\n".join([ids[0], "../../../etc/passwd", *ids[1:]]) + "\n")
    records = scan_split(tiny_voc, "train", processes=1)
    refused = [r for r in records if r.image_id == "train.txt:2"]
    assert len(refused) == 1 and len(records) == len(ids) + 1
    assert refused[0].problem == f"{path}, line 2: '../../../etc/passwd' is not a plain file name; refused unread"
    assert [r.image_id for r in records if r.problem is None] == ids
    submit_chain(tmp_path / "cache", tiny_voc, "train", [])
    serve(WorkerConfig(tmp_path / "cache", until_idle=True, poll_seconds=0.05, processes=1))
    with connect(tmp_path / "cache", read_only=True) as con:
        problems = queries.image_problems(con, dataset_id_for(tiny_voc))
        usable = queries.usable_image_ids(con, dataset_id_for(tiny_voc), "train")
    assert [(p["split"], p["image_id"], p["problem"]) for p in problems] == [("train", "train.txt:2", refused[0].problem)]
    assert usable == sorted(ids)


def test_duplicate_ids_are_reported(tiny_voc):
    ids = _ids(tiny_voc, "val")
    path = tiny_voc / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text("\n".join([*ids, ids[1]]))
    with pytest.raises(DatasetError, match=rf"listed more than once: \['{ids[1]}'\]"):
        read_split_ids(tiny_voc, "val")


def test_missing_root_and_folders(tiny_voc, tmp_path):
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        scan_split(tmp_path / "nowhere", "train")
    shutil.rmtree(tiny_voc / "ImageSets")
    with pytest.raises(DatasetError, match="no split lists"):
        list_splits(tiny_voc)
    shutil.rmtree(tiny_voc / "JPEGImages")
    with pytest.raises(DatasetError, match=rf"{tiny_voc}: no dataset layout found .*JPEGImages"):
        list_splits(tiny_voc)


def test_falls_back_to_segmentation_class(tiny_voc):
    (tiny_voc / "SegmentationClassAug").rename(tiny_voc / "SegmentationClass")
    records = scan_split(tiny_voc, "val")
    assert all(r.problem is None and r.mask_path.parent.name == "SegmentationClass" for r in records)
    shutil.rmtree(tiny_voc / "SegmentationClass")
    with pytest.raises(DatasetError, match=r"no masks \(SegmentationClassAug or SegmentationClass\) and no image-level"):
        scan_split(tiny_voc, "val")
