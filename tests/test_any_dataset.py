"""Any dataset: class sets through the cache, MS COCO 2014 end to end, image-level labels without
masks, and a class set without background. Real images from ../shared/data, real DuckDB."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache import qa, queries, reports
from cache.classes import VOC, ClassSet, read_classes_txt
from cache.db import connect
from engine.core.chains import Step, dataset_id_for
from engine.core.dataset import read_mask
from engine.isle import assignments
from engine.isle.export import export_variant
from engine.runtime import cli
from engine.runtime.jobs import submit_chain
from engine.runtime.trainings import submit_training
from engine.runtime.worker import WorkerConfig, serve

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco2014-mini"
VOC_ROOT = REPO.parent / "shared" / "data" / "voc2012-animals"
TINY_CAM = ["--param", "cam.epochs=1", "--param", "cam.batch_size=8", "--param", "cam.scales=[1.0]",
            "--param", "cam.resize_long=[160,256]", "--param", "cam.crop_size=160"]


def _run(argv: list[str]) -> None:
    cli.main(argv)


def test_class_set_round_trip_through_the_cache(tmp_path):
    classes = ClassSet(("road", "car", "person"), background=None, colours=((128, 64, 128), (0, 0, 142), (220, 20, 60)))
    with connect(tmp_path) as con:
        queries.upsert_dataset(con, "d1", "streets", "/streets", classes, "/streets/dataset.toml")
        queries.upsert_dataset(con, "d2", "animals", "/voc", VOC, "vocdevkit")
    with connect(tmp_path, read_only=True) as con:
        streets, animals = queries.get_dataset(con, "d1"), queries.get_dataset(con, "d2")
    assert streets.classes == classes and streets.layout == "/streets/dataset.toml"
    assert not streets.classes.has_background and streets.classes.foreground == (0, 1, 2)
    assert tuple(streets.classes.palette[1]) == (0, 0, 142) and tuple(streets.classes.palette[255]) == (224, 224, 192)
    assert animals.classes == VOC and animals.classes.foreground == tuple(range(1, 21))


def test_a_cache_made_before_class_sets_reads_its_dataset_as_voc(tmp_path):
    import duckdb

    tmp_path.mkdir(exist_ok=True)
    con = duckdb.connect(str(tmp_path / "workbench.duckdb"))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    con.execute("CREATE TABLE datasets (id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, root VARCHAR NOT NULL, "
                "scanned_at DOUBLE)")
    con.execute("INSERT INTO datasets VALUES ('old', 'animals', '/voc', 1.0)")
    con.close()
    with connect(tmp_path, read_only=True) as con:
        assert queries.get_dataset(con, "old").classes == VOC


@pytest.fixture(scope="module")
def coco_cache(tmp_path_factory):
    """COCO 2014 mini, val split (21 images): CAM and CAM -> dCRF with tiny settings, then an
    import of its own masks."""
    cache = tmp_path_factory.mktemp("coco-cache")
    base = ["--cache", str(cache), "--dataset", str(COCO), "--split", "val"]
    _run([*base, "run", "cam", "dcrf", *TINY_CAM])
    _run([*base, "import", str(COCO / "SegmentationClass" / "val2014"), "--name", "COCO masks"])
    return cache


def test_coco_heatmap_has_the_81_coco_names_and_exact_figures(coco_cache, capsys):
    dataset_id = dataset_id_for(COCO)
    with connect(coco_cache, read_only=True) as con:
        dataset = queries.get_dataset(con, dataset_id)
        table = reports.iou_table(con, dataset_id, "val")
    assert dataset.layout == "coco2014" and dataset.classes == read_classes_txt(COCO / "classes.txt")
    assert table.classes.num_classes == 81 and table.classes.names[1] == "person"
    assert table.iou.shape == (3, 81)
    masks = table.names.index("COCO masks")
    present = table.n_images[masks] > 0
    np.testing.assert_allclose(table.iou[masks][present], 1.0)
    # The classes present are those of the masks, named by classes.txt.
    truth = set()
    for path in (COCO / "SegmentationClass" / "val2014").glob("*.png"):
        truth |= set(np.unique(np.asarray(Image.open(path))).tolist())
    assert set(np.flatnonzero(present).tolist()) == truth
    assert (table.with_truth == 21).all()
    cli.main(["--cache", str(coco_cache), "--dataset", str(COCO), "--split", "val", "status"])
    out = capsys.readouterr().out
    assert "person=" in out and "dining table=" in out and "tvmonitor" not in out


def test_coco_isle_qa_export_and_a_short_deeplab_training(coco_cache, tmp_path):
    dataset_id = dataset_id_for(COCO)
    with connect(coco_cache, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "val") if c.default]
        plan = assignments.build_plan(con, dataset_id, "val", candidates)
    assert len(plan.classes.foreground) == 80 and len(plan.choice_dict()) == 80
    with connect(coco_cache) as con:
        assignments.save(con, plan, "coco")
    step = assignments.merge_step(plan, "coco")
    submit_chain(coco_cache, COCO, "val", [step])
    serve(WorkerConfig(coco_cache, until_idle=True, processes=1))
    merged = assignments.step_variant_id(dataset_id, step)
    with connect(coco_cache, read_only=True) as con:
        table = reports.iou_table(con, dataset_id, "val")
        page = qa.find_images(con, dataset_id, qa.ImageQuery("val", classes=(1,), variant=merged, class_id=1,
                                                             sort="iou"))
    # Every candidate is the ground truth on the classes it was chosen for: the merge is exact too.
    row = table.variant_ids.index(merged)
    present = table.n_images[row] > 0
    np.testing.assert_allclose(table.iou[row][present], 1.0)
    assert page.rows and all(1 in r["labels"] for r in page.rows)  # QA filters by a COCO class (person)
    exported = export_variant(coco_cache, merged, tmp_path / "export")
    assert exported.images == 21
    assert (tmp_path / "export" / "classes.txt").read_text().splitlines() == list(plan.classes.names)
    provenance = json.loads((tmp_path / "export" / "provenance.json").read_text())
    assert provenance["dataset"]["classes"][80] == "toothbrush"
    label = np.asarray(Image.open(next((tmp_path / "export" / "SegmentationClassAug").glob("*.png"))))
    assert set(np.unique(label).tolist()) <= {*range(81), 255}

    queued = submit_training(coco_cache, COCO, merged, {"epochs": 1, "batch_size": 4, "crop_size": 128,
                                                        "resize_long": [128, 192], "val_images": 4},
                             split="val", train_split="val")
    assert queued.job_ids
    serve(WorkerConfig(coco_cache, until_idle=True, processes=1))
    with connect(coco_cache, read_only=True) as con:
        table = reports.iou_table(con, dataset_id, "val")
        jobs = queries.recent_jobs(con, 50)
    assert all(j.status == "done" for j in jobs), [(j.id, j.status, j.error) for j in jobs]
    deeplab = [n for n in table.names if "DeepLabV3+" in n]
    assert deeplab and table.iou.shape[1] == 81


def _voc_without_masks(tmp_path: Path, ids: list[str]) -> Path:
    """A VOCdevkit root with images and a PSA/IRN cls_labels.npy but no mask folder."""
    root = tmp_path / "voc-no-masks"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    labels = {}
    for image_id in ids:
        shutil.copyfile(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", root / "JPEGImages" / f"{image_id}.jpg")
        mask = read_mask(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png")
        vector = np.zeros(20, np.float32)
        vector[[c - 1 for c in np.unique(mask) if 0 < c < 255]] = 1.0
        labels[int(image_id.replace("_", ""))] = vector
    np.save(root / "cls_labels.npy", labels)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_voc_without_masks_gets_pseudo_labels_and_says_no_ground_truth(tmp_path, capsys):
    ids = (VOC_ROOT / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:8]
    root = _voc_without_masks(tmp_path, ids)
    cache = tmp_path / "cache"
    _run(["--cache", str(cache), "--dataset", str(root), "run", "cam", *TINY_CAM])
    dataset_id = dataset_id_for(root)
    with connect(cache, read_only=True) as con:
        images = queries.usable_images(con, dataset_id, "train")
        table = reports.iou_table(con, dataset_id, "train")
    assert len(images) == 8 and all(r.mask_path is None and r.labels for r in images)
    expected = {i: tuple(int(c) for c in np.unique(read_mask(VOC_ROOT / "SegmentationClassAug" / f"{i}.png"))
                         if 0 < c < 255) for i in ids}
    assert {r.image_id: r.labels for r in images} == expected
    assert table.labelled.tolist() == [8] and table.with_truth.tolist() == [0]
    assert np.isnan(table.miou).all()  # no figure, not 0
    _run(["--cache", str(cache), "--dataset", str(root), "status"])
    assert "no ground truth (0 of 8 images have masks)" in capsys.readouterr().out


def _street_dataset(tmp_path: Path) -> tuple[Path, list[str]]:
    """A class set without background (label 0 "scene" is a real class), from VOC cat/dog
    images: scene = VOC background, cat = 1, dog = 2; described by a hand-written TOML file."""
    root = tmp_path / "streets"
    for folder in ("images", "masks", "lists"):
        (root / folder).mkdir(parents=True)
    ids = []
    for image_id in (VOC_ROOT / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        mask = read_mask(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png")
        if not set(np.unique(mask).tolist()) <= {0, 8, 12, 255}:
            continue
        remapped = np.select([mask == 0, mask == 8, mask == 12], [0, 1, 2], 255).astype(np.uint8)
        Image.fromarray(remapped, mode="L").save(root / "masks" / f"{image_id}.png")
        shutil.copyfile(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
        ids.append(image_id)
        if len(ids) == 6:
            break
    (root / "lists" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "dataset.toml").write_text(
        'name = "streets"\nclasses = ["scene", "cat", "dog"]\nbackground = "none"\n'
        'images = "images/{id}.jpg"\nmasks = "masks/{id}.png"\n[splits.train]\nlist = "lists/train.txt"\n')
    return root, ids


def test_a_class_set_without_background_refuses_cam_and_accepts_import_and_isle(tmp_path):
    root, ids = _street_dataset(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="CAM needs a background class .*'scene' is label 0"):
        submit_chain(cache, root, "train", [Step("cam")])
    # Two imports: the masks themselves, and the masks with "scene" made undecided.
    shifted = tmp_path / "no-scene"
    shifted.mkdir()
    for image_id in ids:
        mask = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        Image.fromarray(np.where(mask == 0, 255, mask).astype(np.uint8), mode="L").save(shifted / f"{image_id}.png")
    base = ["--cache", str(cache), "--dataset", str(root)]
    _run([*base, "import", str(root / "masks"), "--name", "truth"])
    _run([*base, "import", str(shifted), "--name", "no scene"])
    dataset_id = dataset_id_for(root)
    with connect(cache, read_only=True) as con:
        dataset = queries.get_dataset(con, dataset_id)
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train")]
        plan = assignments.build_plan(con, dataset_id, "train", candidates)
    assert dataset.name == "streets" and dataset.classes.names == ("scene", "cat", "dog")
    assert not dataset.classes.has_background
    assert sorted(plan.choice_dict()) == ["0", "1", "2"]  # every class is assigned, "scene" included
    truth = candidates[[n for n in plan.names].index("truth")]
    assert plan.chosen(0) == truth
    step = assignments.merge_step(plan, "streets")
    submit_chain(cache, root, "train", [step])
    serve(WorkerConfig(cache, until_idle=True, processes=1))
    with connect(cache, read_only=True) as con:
        table = reports.iou_table(con, dataset_id, "train")
    row = table.variant_ids.index(assignments.step_variant_id(dataset_id, step))
    np.testing.assert_allclose(table.iou[row], 1.0)  # scene from "truth", cat and dog from either


SOURCES = [REPO / d for d in ("engine", "cache", "ui", "app_pages")] + [REPO / "app.py"]
CLASS_COUNT = re.compile(
    r"NUM_CLASSES|NUM_FOREGROUND|VOC_CLASSES|VOC_PALETTE|cache\.voc|aeroplane|tvmonitor"  # the old constants
    r"|\b[01]-(20|80)\b|\b[01]\.\.(20|80)\b"  # "0-20", "1-20", "1..80"
    r"|\((20|21|80|81),|, (20|21|80|81)\)|range\((1, )?(20|21|80|81)\)"  # (21, ...), range(1, 21)
    r"|\b(20|21|80|81) (object |foreground |VOC |COCO )?classes")


def test_no_module_outside_the_class_set_code_names_a_class_count():
    found = []
    for source in SOURCES:
        for path in [source] if source.is_file() else sorted(source.rglob("*.py")):
            if path == REPO / "cache" / "classes.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if CLASS_COUNT.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def _readme_description() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```toml\n(# /data/streets/dataset.toml.*?)```", text, re.S)
    assert block, "README: the description file example is missing"
    return block.group(1)


def test_the_readme_description_file_registers_real_images(tmp_path):
    """The README's hand-written description, verbatim, over VOC cat/dog images: "car" = VOC cat
    and "person" = VOC dog, the rest "road"; train has masks, unlabelled only the CSV labels."""
    root = tmp_path / "streets"
    for folder in ("images/train", "images/unlabelled", "masks/train", "lists"):
        (root / folder).mkdir(parents=True)
    (root / "dataset.toml").write_text(_readme_description())
    ids = [i for i in (VOC_ROOT / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
           if set(np.unique(read_mask(VOC_ROOT / "SegmentationClassAug" / f"{i}.png")).tolist()) <= {0, 8, 12, 255}][:6]
    rows = []
    for k, image_id in enumerate(ids):
        split = "train" if k < 4 else "unlabelled"
        shutil.copyfile(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", root / "images" / split / f"{image_id}.jpg")
        mask = read_mask(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png")
        if split == "train":
            remapped = np.select([mask == 0, mask == 8, mask == 12], [0, 2, 3], 255).astype(np.uint8)
            Image.fromarray(remapped, mode="L").save(root / "masks" / "train" / f"{image_id}.png")
        names = [n for c, n in ((0, "road"), (8, "car"), (12, "person")) if c in mask]  # road is a class here
        rows.append(f"{image_id},{';'.join(names)}")
    (root / "labels.csv").write_text("image_id,classes\n" + "\n".join(rows) + "\n")
    (root / "lists" / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (root / "lists" / "unlabelled.txt").write_text("\n".join(ids[4:]) + "\n")

    cache = tmp_path / "cache"
    for split in ("train", "unlabelled"):
        _run(["--cache", str(cache), "--dataset", str(root), "--split", split, "import",
              str(root / "masks" / "train"), "--name", "train masks"])
    dataset_id = dataset_id_for(root)
    with connect(cache, read_only=True) as con:
        dataset = queries.get_dataset(con, dataset_id)
        train = queries.usable_images(con, dataset_id, "train")
        unlabelled = queries.usable_images(con, dataset_id, "unlabelled")
        table = reports.iou_table(con, dataset_id, "train")
        errors = [e for j in queries.recent_jobs(con) for e in queries.image_errors(con, j.id)]
    assert dataset.name == "streets" and dataset.classes.names[:3] == ("road", "sidewalk", "car")
    assert not dataset.classes.has_background and dataset.layout == str(root / "dataset.toml")
    assert all(r.mask_path for r in train) and not any(r.mask_path for r in unlabelled)
    assert {r.image_id: r.labels for r in unlabelled} == {
        i: tuple(c for c, v in ((0, 0), (2, 8), (3, 12)) if v in read_mask(VOC_ROOT / "SegmentationClassAug" / f"{i}.png"))
        for i in ids[4:]}
    np.testing.assert_allclose(table.iou[0][table.n_images[0] > 0], 1.0)
    assert table.with_truth.tolist() == [4]
    # The unlabelled split has no label maps in the masks folder: one clear error per image.
    assert len(errors) == 2 and all("label map file is missing" in e["message"] for e in errors)
