"""Dataset layouts and image-level label files, on the bundled VOC 2012 and COCO 2014 samples."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.classes import COCO, VOC, ClassSet, read_classes_txt
from engine.core.image_labels import decode_voc_int_id, labels_from_vector, read_image_labels
from engine.core.layouts import (DatasetError, LabelSource, detect_layout, read_description, read_split_entries,
                                 read_split_ids)
from tests.conftest import REPO, VOC_ROOT, make_voc_copy

COCO_ROOT = (REPO / ".." / "shared" / "data" / "coco2014-mini").resolve()
VOC_IDS = {"train": ["2007_000063", "2007_000392", "2007_000464"], "val": ["2007_000491", "2007_000549"]}


def mask_classes(path: Path, classes: ClassSet) -> tuple[int, ...]:
    """The object classes present in a mask file (background and 255 left out)."""
    present = np.unique(np.asarray(Image.open(path)))
    return tuple(int(c) for c in present if int(c) in classes.foreground)


# -- automatic layouts ----------------------------------------------------------------------


def test_vocdevkit_is_detected_with_voc_classes_and_mask_labels():
    layout = detect_layout(VOC_ROOT)
    assert (layout.kind, layout.layout_name, layout.classes) == ("vocdevkit", "vocdevkit", VOC)
    assert layout.labels == LabelSource("masks", None)
    assert [s.name for s in layout.splits] == ["train", "val"]
    train = layout.split("train")
    assert train.list_path == VOC_ROOT / "ImageSets" / "Segmentation" / "train.txt"
    ids = read_split_ids(train)
    assert len(ids) == 1861
    assert layout.image_path(train, ids[0]) == VOC_ROOT / "JPEGImages" / f"{ids[0]}.jpg"
    assert layout.mask_path(train, ids[0]) == VOC_ROOT / "SegmentationClassAug" / f"{ids[0]}.png"
    with pytest.raises(DatasetError, match="unknown split 'test'; valid: train, val"):
        layout.split("test")


def test_coco2014_is_detected_with_its_81_classes_and_three_splits():
    layout = detect_layout(COCO_ROOT)
    assert layout.kind == "coco2014" and layout.labels.kind == "masks"
    assert layout.classes.num_classes == 81 and layout.classes.names[0] == "background"
    assert layout.classes.background == 0 and layout.classes.names[80] == "toothbrush"
    assert [s.name for s in layout.splits] == ["train", "val", "val_part"]
    for split, year, count in (("train", "train2014", 39), ("val", "val2014", 21), ("val_part", "val2014", 21)):
        s = layout.split(split)
        ids = read_split_ids(s)
        assert len(ids) == count and s.list_path == COCO_ROOT / "lists" / f"{split}.txt"
        image, mask = layout.image_path(s, ids[0]), layout.mask_path(s, ids[0])
        assert image == COCO_ROOT / "coco2014" / year / f"{ids[0]}.jpg" and image.is_file()
        assert mask == COCO_ROOT / "SegmentationClass" / year / f"{ids[0]}.png" and mask.is_file()


def _coco_without_masks(tmp_path: Path) -> Path:
    """A COCO 2014 folder with the real images but no masks, MCTformer's train_id.txt only."""
    root = tmp_path / "coco"
    (root / "lists").mkdir(parents=True)
    (root / "coco2014").symlink_to(COCO_ROOT / "coco2014")
    shutil.copy(COCO_ROOT / "classes.txt", root)
    shutil.copy(COCO_ROOT / "lists" / "train_id.txt", root / "lists")
    return root


def test_mctformer_lists_give_split_train_and_onehot_labels(tmp_path):
    root = _coco_without_masks(tmp_path)
    with pytest.raises(DatasetError, match="no masks .* no image-level label file"):
        detect_layout(root)
    shutil.copy(COCO_ROOT / "lists" / "cls_labels_onehot.npy", root / "lists")
    layout = detect_layout(root)
    assert [s.name for s in layout.splits] == ["train"]
    train = layout.splits[0]
    assert train.list_path == root / "lists" / "train_id.txt" and train.masks is None
    assert layout.labels == LabelSource("onehot", root / "lists" / "cls_labels_onehot.npy")
    first = read_split_ids(train)[0]
    assert layout.image_path(train, first).is_file() and layout.mask_path(train, first) is None


def test_coco2014_without_classes_txt_gets_the_coco_class_set(tmp_path):
    root = _coco_without_masks(tmp_path)
    (root / "classes.txt").unlink()
    shutil.copy(COCO_ROOT / "lists" / "cls_labels_onehot.npy", root / "lists")
    layout = detect_layout(root)
    assert layout.classes == COCO == read_classes_txt(COCO_ROOT / "classes.txt")


def test_detection_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nowhere'}: dataset root does not exist"):
        detect_layout(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no dataset layout found .*dataset.toml.*JPEGImages.*coco2014/train2014"):
        detect_layout(tmp_path)
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DatasetError, match="ImageSets/Segmentation: no split lists"):
        detect_layout(tmp_path)


@pytest.mark.parametrize("text, problem", [
    ("", "holds no image ids"),
    ("a\nb\na\n", r"listed more than once: \['a'\]"),
    ("../b\n/etc/passwd\n", r"holds no image ids \(2 entries refused: not plain file names\)"),
])
def test_read_split_ids_refuses_bad_lists(tmp_path, text, problem):
    voc = make_voc_copy(tmp_path / "voc", {"train": VOC_IDS["train"]})
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(text)
    split = detect_layout(voc).split("train")
    with pytest.raises(DatasetError, match=f"{split.list_path}: .*{problem}"):
        read_split_ids(split)


def test_entries_that_are_not_plain_file_names_are_refused_and_the_rest_kept(tmp_path):
    voc = make_voc_copy(tmp_path / "voc", {"train": VOC_IDS["train"]})
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(
        "a\n../../../etc/passwd\n\nb\n..\\x 1\n/etc/shadow\n..\nc\n")
    split = detect_layout(voc).split("train")
    assert read_split_entries(split) == (["a", "b", "c"], [(2, "../../../etc/passwd"), (5, "..\\x"),
                                                            (6, "/etc/shadow"), (7, "..")])
    assert read_split_ids(split) == ["a", "b", "c"]


def test_read_split_ids_takes_the_first_token_in_file_order(tmp_path):
    voc = make_voc_copy(tmp_path / "voc", {"train": VOC_IDS["train"]})
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("b 1\n\n  a -1\nc\n")
    assert read_split_ids(detect_layout(voc).split("train")) == ["b", "a", "c"]


# -- description files ----------------------------------------------------------------------


def _described_copy(tmp_path: Path) -> Path:
    """Real VOC images and masks rearranged as ``images/<split>/<id>.jpg``, ``masks/<split>/<id>.png``."""
    root = tmp_path / "streets"
    for split, ids in VOC_IDS.items():
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True)
        for image_id in ids:
            shutil.copy(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", root / "images" / split)
            shutil.copy(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png", root / "masks" / split)
    (root / "lists").mkdir()
    for split, ids in VOC_IDS.items():
        (root / "lists" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(VOC.names) + "\n")
    return root


DESCRIPTION = """\
name = "animals"
classes = "classes.txt"
background = "auto"
images = "images/{split}/{id}.jpg"
masks = "masks/{split}/{id}.png"

[splits.train]
list = "lists/train.txt"

[splits.val]
list = "lists/val.txt"
"""
DESCRIPTION_DICT = {
    "name": "animals", "classes": "classes.txt", "background": "auto",
    "images": "images/{split}/{id}.jpg", "masks": "masks/{split}/{id}.png",
    "splits": {"train": {"list": "lists/train.txt"}, "val": {"list": "lists/val.txt"}},
}


def _check_described(layout, description: Path) -> None:
    root = description.parent
    assert (layout.kind, layout.description, layout.layout_name) == \
        ("description", description, str(description))
    assert (layout.root, layout.name, layout.classes) == (root, "animals", VOC)
    assert layout.labels == LabelSource("masks", None)
    assert [s.name for s in layout.splits] == ["train", "val"]
    val = layout.split("val")
    assert (val.list_path, val.images, val.masks) == \
        (root / "lists" / "val.txt", "images/val/{id}.jpg", "masks/val/{id}.png")
    for split in layout.splits:
        ids = read_split_ids(split)
        assert ids == VOC_IDS[split.name]
        assert all(layout.image_path(split, i).is_file() and layout.mask_path(split, i).is_file() for i in ids)


def test_toml_description_gives_the_layout(tmp_path):
    root = _described_copy(tmp_path)
    (root / "dataset.toml").write_text(DESCRIPTION)
    _check_described(read_description(root / "dataset.toml"), root / "dataset.toml")
    _check_described(detect_layout(root), root / "dataset.toml")  # a folder holding dataset.toml


def test_json_description_gives_the_same_layout(tmp_path):
    root = _described_copy(tmp_path)
    (root / "dataset.json").write_text(json.dumps(DESCRIPTION_DICT, indent=2))
    _check_described(detect_layout(root / "dataset.json"), root / "dataset.json")


def test_description_with_root_inline_classes_label_file_and_split_override(tmp_path):
    root = _described_copy(tmp_path)
    (root / "labels.csv").write_text("image_id,classes\n")
    config = tmp_path / "configs" / "animals.toml"
    config.parent.mkdir()
    config.write_text("""\
root = "../streets"
classes = ["road", "car"]
background = "none"
images = "images/{split}/{id}.jpg"
[labels]
from = "csv"
path = "labels.csv"
[splits.train]
list = "lists/train.txt"
[splits.holdout]
list = "lists/val.txt"
images = "images/val/{id}.jpg"
""")
    layout = detect_layout(config)
    assert layout.root == root and layout.name == "streets" and layout.description == config
    assert layout.classes == ClassSet(("road", "car"), None)
    assert layout.labels == LabelSource("csv", root / "labels.csv")
    holdout = layout.split("holdout")
    assert (holdout.images, holdout.masks) == ("images/val/{id}.jpg", None)
    assert layout.image_path(holdout, VOC_IDS["val"][0]).is_file()


def test_voc_class_keyword_with_background_none_makes_every_label_a_class(tmp_path):
    root = _described_copy(tmp_path)
    (root / "dataset.toml").write_text(DESCRIPTION.replace('"classes.txt"', '"voc"').replace('"auto"', '"none"'))
    classes = detect_layout(root).classes
    assert classes.names == VOC.names and classes.background is None


# (change to DESCRIPTION: old -> new, or None to append `new`), field named in the error, problem
DESCRIPTION_ERRORS = [
    (('name = "animals"', 'colour = "red"'), "colour", "unknown key; valid: name, root, classes"),
    (('[splits.val]', '[splits.val]\nlst = "x"'), "splits.val.lst", "unknown key; valid: list, images, masks"),
    ((None, '[labels]\nfrom = "masks"\nfile = "x"\n'), "labels.file", "unknown key; valid: from, path"),
    (('classes = "classes.txt"', ""), "classes", "required key is missing"),
    (('classes = "classes.txt"', 'classes = "names.txt"'), "classes", "file names.txt does not exist"),
    (('classes = "classes.txt"', 'classes = ["cat", "cat"]'), "classes", "class name 'cat' is used by"),
    (('classes = "classes.txt"', "classes = []"), "classes", "1-255 classes, got 0"),
    (('classes = "classes.txt"', 'classes = ["cat", 3]'), "classes", "names \\(strings\\) only"),
    (('background = "auto"', "background = 1"), "background", "expected \"auto\", 0 or \"none\", got 1"),
    (('background = "auto"', "background = false"), "background", "got False"),
    (('images = "images/{split}/{id}.jpg"', ""), "splits.train.images", "required when there is no top-level"),
    (('images = "images/{split}/{id}.jpg"', 'images = "images/{split}.jpg"'), "images", "has no {id}"),
    (('images = "images/{split}/{id}.jpg"', 'images = "images/{name}/{id}.jpg"'), "images",
     "unknown placeholder {name}"),
    (('masks = "masks/{split}/{id}.png"', 'masks = "masks/{split}/{id.png"'), "masks", "unbalanced brace"),
    (('[splits.val]\nlist = "lists/val.txt"', '[splits.val]\nlist = "lists/val.txt"\nmasks = "m/{ids}.png"'),
     "splits.val.masks", "unknown placeholder {ids}"),
    (('list = "lists/train.txt"', 'list = "lists/training.txt"'), "splits.train.list",
     "file lists/training.txt does not exist"),
    (('list = "lists/train.txt"', 'images = "x/{id}.jpg"'), "splits.train.list", "required"),
    (('[splits.train]\nlist = "lists/train.txt"\n\n[splits.val]\nlist = "lists/val.txt"\n', "splits = {}\n"),
     "splits", "no splits declared"),
    (('[splits.train]\nlist = "lists/train.txt"\n\n[splits.val]\nlist = "lists/val.txt"\n', ""),
     "splits", "required key is missing"),
    ((None, '[labels]\nfrom = "points"\n'), "labels.from", "unknown label source 'points'; valid: masks, onehot"),
    ((None, '[labels]\nfrom = "onehot"\n'), "labels.path", "required with from = 'onehot'"),
    ((None, '[labels]\nfrom = "csv"\npath = "labels.csv"\n'), "labels.path", "file labels.csv does not exist"),
    ((None, '[labels]\nfrom = "masks"\npath = "classes.txt"\n'), "labels.path", "not used with from"),
    (('masks = "masks/{split}/{id}.png"', ""), "masks", "split\\(s\\) train, val have no masks template"),
    (('name = "animals"', 'root = "elsewhere"'), "root", "folder elsewhere does not exist"),
    (('name = "animals"', "name = 5"), "name", "expected a non-empty string, got 5"),
]


@pytest.mark.parametrize("change, field, problem", DESCRIPTION_ERRORS,
                         ids=[f"{e[1]}:{e[2][:24]}" for e in DESCRIPTION_ERRORS])
def test_description_errors_name_the_file_and_the_field(tmp_path, change, field, problem):
    root = _described_copy(tmp_path)
    old, new = change
    text = DESCRIPTION + new if old is None else DESCRIPTION.replace(old, new, 1)
    assert text != DESCRIPTION
    (root / "dataset.toml").write_text(text)
    with pytest.raises(DatasetError) as caught:
        detect_layout(root)
    message = str(caught.value)
    assert message.startswith(f"{root / 'dataset.toml'}: field '{field}': "), message
    assert re.search(problem, message), message


def test_invalid_toml_and_json_name_the_file_and_line(tmp_path):
    root = _described_copy(tmp_path)
    (root / "dataset.toml").write_text(DESCRIPTION.replace('background = "auto"', "background = "))
    with pytest.raises(DatasetError, match=r"dataset.toml: invalid TOML: .*line 3"):
        detect_layout(root)
    (root / "dataset.toml").unlink()
    (root / "dataset.json").write_text('{\n  "classes": "classes.txt",\n  "splits": {,}\n}\n')
    with pytest.raises(DatasetError, match=r"dataset.json: invalid JSON at line 3"):
        detect_layout(root)
    (root / "dataset.json").write_text('["classes"]')
    with pytest.raises(DatasetError, match=r"dataset.json: expected a JSON object"):
        detect_layout(root)


# -- image-level label files ----------------------------------------------------------------


def test_labels_from_vector_by_hand():
    streets = ClassSet(("road", "car", "tree"), background=None)  # no background: element k = label k
    assert labels_from_vector(np.array([1.0, 0.0, 0.7], np.float32), streets) == (0, 2)
    vector = np.zeros(20, np.float32)
    vector[[7, 14]] = 1.0  # VOC element k = label k + 1: cat, person
    assert labels_from_vector(vector, VOC) == (8, 15)
    assert labels_from_vector(np.full(20, 0.5, np.float32), VOC) == ()  # 0.5 is not above 0.5
    with pytest.raises(ValueError, match=r"expected a \(20,\) numeric vector, got shape \(21,\)"):
        labels_from_vector(np.zeros(21), VOC)
    assert decode_voc_int_id(2007000032) == "2007_000032"


def test_coco_onehot_labels_equal_the_classes_in_every_mask():
    layout = detect_layout(COCO_ROOT)
    labels = read_image_labels(LabelSource("onehot", COCO_ROOT / "lists" / "cls_labels_onehot.npy"), layout.classes)
    checked = 0
    for split in layout.splits[:2]:  # val_part repeats val
        for image_id in read_split_ids(split):
            assert labels[image_id] == mask_classes(layout.mask_path(split, image_id), layout.classes), image_id
            checked += 1
    assert checked == len(labels) == 60
    assert labels["COCO_train2014_000000000034"] == (23,)  # README: 000034 is the zebra image


def test_cls_labels_npy_with_int_keys_gives_voc_ids(tmp_path):
    voc = make_voc_copy(tmp_path / "voc", {"train": VOC_IDS["train"]})
    shutil.rmtree(voc / "SegmentationClassAug")
    expected, table = {}, {}
    for image_id in VOC_IDS["train"]:
        expected[image_id] = mask_classes(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png", VOC)
        vector = np.zeros(20, np.float32)
        vector[[c - 1 for c in expected[image_id]]] = 1.0
        table[int(image_id.replace("_", ""))] = vector  # PSA/IRN key: 2007_000063 -> 2007000063
    np.save(voc / "cls_labels.npy", table)
    layout = detect_layout(voc)
    assert layout.labels == LabelSource("cls_labels", voc / "cls_labels.npy")
    assert layout.split("train").masks is None
    assert read_image_labels(layout.labels, layout.classes) == expected
    assert all(expected.values()) and len(expected) == 3


def test_vocdevkit_without_masks_or_label_file_says_so(tmp_path):
    voc = make_voc_copy(tmp_path / "voc", {"train": VOC_IDS["train"]})
    shutil.rmtree(voc / "SegmentationClassAug")
    with pytest.raises(DatasetError, match=f"{voc}: no masks .* and no image-level label file"):
        detect_layout(voc)


def test_csv_labels_by_hand(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image_id,classes\n2007_000063,cat;dog\n\n2007_000392, person , sheep\n"
                    "2007_000464,\n2007_000491\n\"2007_000549\",\"cow; cat\",cat\n")
    assert read_image_labels(LabelSource("csv", path), VOC) == {
        "2007_000063": (8, 12), "2007_000392": (15, 17), "2007_000464": (), "2007_000491": (),
        "2007_000549": (8, 10),
    }


@pytest.mark.parametrize("text, problem", [
    ("image_id,classes\na,cat\nb,cat;zebra\n", r"labels.csv, line 3: unknown object class 'zebra'"),
    ("a,cat\nb,background\n", r"labels.csv, line 2: unknown object class 'background'"),
    ("a,cat\n\na,dog\n", r"labels.csv, line 3: image a is given twice"),
    ("a,cat\n,dog\n", r"labels.csv, line 2: the first column \(image id\) is empty"),
])
def test_malformed_csv_names_file_and_line(tmp_path, text, problem):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=problem):
        read_image_labels(LabelSource("csv", tmp_path / "labels.csv"), VOC)


def test_malformed_npy_label_files_name_the_file_and_key(tmp_path):
    path = tmp_path / "labels.npy"
    np.save(path, {"2007_000063": np.zeros(20, np.float32), "2007_000392": np.zeros(19, np.float32)})
    with pytest.raises(DatasetError, match=r"labels.npy: key '2007_000392': expected a \(20,\) numeric vector"):
        read_image_labels(LabelSource("onehot", path), VOC)
    np.save(path, {2007000063: np.zeros(20, np.float32)})
    with pytest.raises(DatasetError, match=r"labels.npy: key 2007000063: expected a str image id"):
        read_image_labels(LabelSource("onehot", path), VOC)
    np.save(path, {123: np.zeros(20, np.float32)})
    with pytest.raises(DatasetError, match=r"labels.npy: key 123: 123 is not an int-encoded VOC id"):
        read_image_labels(LabelSource("cls_labels", path), VOC)
    np.save(path, {2007000063: np.zeros(20, np.float32), "2007_000063": np.zeros(20, np.float32)})
    with pytest.raises(DatasetError, match=r"labels.npy: key '2007_000063': image 2007_000063 is given twice"):
        read_image_labels(LabelSource("cls_labels", path), VOC)
    np.save(path, np.zeros((3, 20), np.float32))
    with pytest.raises(DatasetError, match=r"labels.npy: expected a pickled dict"):
        read_image_labels(LabelSource("onehot", path), VOC)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(DatasetError, match=r"labels.npy: cannot read the label file"):
        read_image_labels(LabelSource("cls_labels", path), VOC)
    with pytest.raises(DatasetError, match=r"missing.npy: image-level label file is missing"):
        read_image_labels(LabelSource("onehot", tmp_path / "missing.npy"), VOC)
