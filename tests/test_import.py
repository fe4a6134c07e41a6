"""engine/methods/imported.py: npy dicts to labels by hand, then folders imported through the real
worker (PNG with bad files, npy), re-import, and the ``python -m engine import`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.classes import VOC
from cache import queries
from cache.db import connect
from cache.labelmaps import read_label_map, read_scores, write_label_map
from engine.core import registry
from engine.core.chains import dataset_id_for
from engine.core.dataset import image_labels, read_mask
from engine.methods.imported import check_label, class_ids, import_step, npy_scores, with_background
from engine.ops.cams import cams_to_label
from engine.ops.metrics import confusion_counts
from engine.ops.scores import argmax_label as scores_to_label
from engine.runtime.cli import main
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import REPO

# Two classes on a 2x3 grid: dog (12) and person (15), stored IRN-style as keys 11 and 14.
DOG = [[0.9, 0.1, 0.3], [0.0, 0.2, 0.16]]
PERSON = [[0.5, 0.6, 0.3], [0.1, 0.15, 0.0]]


def _dict(key: str = "high_res", keys=(11, 14), scores=(DOG, PERSON)) -> dict:
    return {"keys": np.array(keys), key: np.array(scores, dtype=np.float32)}


# ---------------------------------------------------------------- numerics worked out by hand

def test_keys_conventions():
    assert class_ids(np.array([11, 14]), "index", VOC.num_classes) == (12, 15)  # IRN: class id = key + 1
    assert class_ids(torch.tensor([0, 19]), "index", VOC.num_classes) == (1, 20)  # IRN pickles a torch tensor
    assert class_ids([0, 12, 15], "class_id", VOC.num_classes) == (12, 15)  # PuzzleCAM: leading 0 = background
    assert class_ids([12, 15], "class_id", VOC.num_classes) == (12, 15)
    assert class_ids(np.array([7.0]), "class_id", VOC.num_classes) == (7,)
    assert class_ids(np.array([], dtype=np.int64), "index", VOC.num_classes) == ()
    with pytest.raises(ValueError, match=r"\[21\] outside 1-20"):
        class_ids([20], "index", VOC.num_classes)
    with pytest.raises(ValueError, match="repeat"):
        class_ids([3, 3], "index", VOC.num_classes)
    with pytest.raises(ValueError, match="1-D integers"):
        class_ids(np.array([[1, 2]]), "index", VOC.num_classes)
    with pytest.raises(ValueError, match="1-D integers"):
        class_ids(np.array([1.5]), "index", VOC.num_classes)


def test_npy_scores_threshold_and_argmax_by_hand():
    key, classes, scores = npy_scores(_dict(), None, "index", None, VOC.num_classes)
    assert key == "high_res" and classes == (0, 12, 15)
    # Background is a constant 0.15 channel (IRN cam_eval_thres) put first.
    assert scores.shape == (3, 2, 3) and np.all(scores[0] == np.float32(0.15))
    # Per pixel, max of (0.15, dog, person):
    #   (0,0) .9 dog | (0,1) .6 person | (0,2) dog .3 ties person .3 -> dog (first class)
    #   (1,0) .15 bg | (1,1) .2 dog    | (1,2) .16 dog
    expected = np.array([[12, 15, 12], [0, 12, 12]], dtype=np.uint8)
    label = scores_to_label(scores, classes)
    assert label.dtype == np.uint8 and np.array_equal(label, expected)
    # The same as the CAM baseline's pad-threshold-argmax.
    assert np.array_equal(label, cams_to_label(np.array([DOG, PERSON], np.float32), (12, 15), 0.15))

    # 0.25: (1,1) 0.2 and (1,2) 0.16 fall to background; at 0.3 (0,2) ties background -> background.
    _, _, at_25 = npy_scores(_dict(), None, "index", 0.25, VOC.num_classes)
    assert np.array_equal(scores_to_label(at_25, classes), [[12, 15, 12], [0, 0, 0]])
    _, _, at_30 = npy_scores(_dict(), None, "index", 0.3, VOC.num_classes)
    assert np.array_equal(scores_to_label(at_30, classes), [[12, 15, 0], [0, 0, 0]])
    # Random-walk scores default to IRN's sem_seg_bg_thres 0.25.
    key, _, rw = npy_scores(_dict("rw"), None, "index", None, VOC.num_classes)
    assert key == "rw" and np.all(rw[0] == np.float32(0.25))
    assert np.array_equal(scores_to_label(rw, classes), [[12, 15, 12], [0, 0, 0]])
    # PuzzleCAM keys (class ids, background first) give the same label.
    _, puzzle_classes, puzzle = npy_scores(_dict("hr_cam", keys=(0, 12, 15)), None, "class_id", None, VOC.num_classes)
    assert puzzle_classes == (0, 12, 15) and np.array_equal(scores_to_label(puzzle, puzzle_classes), expected)


def test_k_plus_one_channels_keep_their_background():
    # cat (8) as IRN key 7, background first: bg [0.5, 0.1], cat [0.4, 0.2] -> [0, 8] whatever the threshold.
    data = {"keys": np.array([7]), "rw": np.array([[[0.5, 0.1]], [[0.4, 0.2]]], dtype=np.float32)}
    for threshold in (None, 0.0, 0.9):
        _, classes, scores = npy_scores(data, None, "index", threshold, VOC.num_classes)
        assert classes == (0, 8) and np.array_equal(scores, data["rw"])
        assert np.array_equal(scores_to_label(scores, classes), [[0, 8]])
    assert with_background(np.zeros((2, 1, 1)), 1, 0.5).shape == (2, 1, 1)
    assert with_background(np.zeros((1, 1, 1)), 1, 0.5)[0, 0, 0] == np.float32(0.5)


def test_score_key_choice_and_bad_dicts():
    strided = np.zeros((2, 1, 1), np.float32)
    data = {**_dict(), "cam": torch.from_numpy(strided)}  # IRN: stride-4 'cam' next to 'high_res'
    assert npy_scores(data, None, "index", None, VOC.num_classes)[0] == "high_res"
    assert npy_scores(data, "cam", "index", None, VOC.num_classes)[2].shape == (3, 1, 1)
    with pytest.raises(ValueError, match="no score entry 'rw'"):
        npy_scores(data, "rw", "index", None, VOC.num_classes)
    with pytest.raises(ValueError, match="no score entry any of"):
        npy_scores({"keys": [1]}, None, "index", None, VOC.num_classes)
    with pytest.raises(ValueError, match="no 'keys' entry"):
        npy_scores({"high_res": strided}, None, "index", None, VOC.num_classes)
    with pytest.raises(ValueError, match=r"4 score channel\(s\) for 2 class key\(s\)"):
        npy_scores(_dict(scores=np.zeros((4, 2, 3))), None, "index", None, VOC.num_classes)
    with pytest.raises(ValueError, match="outside"):
        npy_scores(_dict(scores=np.full((2, 2, 3), 3.0)), None, "index", None, VOC.num_classes)
    with pytest.raises(ValueError, match="NaN"):
        npy_scores(_dict(scores=np.full((2, 2, 3), np.nan)), None, "index", None, VOC.num_classes)


def test_check_label_size_values_and_absent_classes():
    label = np.array([[0, 12], [255, 15]], dtype=np.uint8)
    check_label(label, (2, 2), (12, 15), VOC)
    with pytest.raises(ValueError, match=r"2x2 \(WxH\) but the image is 3x2"):
        check_label(label, (2, 3), (12, 15), VOC)
    with pytest.raises(ValueError, match=r"\[42\] are not classes \(valid: 0-20 and 255\)"):
        check_label(np.array([[42, 0]], np.uint8), (1, 2), (12,), VOC)
    with pytest.raises(ValueError, match=r"15 \(person\) not among the image's labels 12 \(dog\)"):
        check_label(label, (2, 2), (12,), VOC)


def test_import_step_checks_before_queueing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_step(tmp_path / "nowhere", "x")
    np.save(tmp_path / "a.npy", _dict())
    with pytest.raises(ValueError, match="no .png files .*format 'npy'"):
        import_step(tmp_path, "x")
    with pytest.raises(ValueError, match="'npy' only"):
        import_step(tmp_path, "x", bg_threshold=0.2)
    with pytest.raises(ValueError, match="keys must be one of"):
        import_step(tmp_path, "x", format="npy", keys="one_based")
    step = import_step(tmp_path, " ", format="npy")
    assert step.title == tmp_path.name and step.params == {"format": "npy", "folder": str(tmp_path.resolve())}
    assert registry.get("import").title == "Imported"


# ---------------------------------------------------------------- through the real worker

def _train_images(root: Path) -> list[tuple[str, np.ndarray]]:
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    return [(i, read_mask(root / "SegmentationClassAug" / f"{i}.png")) for i in ids]


def _pseudo_label(mask: np.ndarray) -> np.ndarray:
    """A plausible pseudo-label of a real mask: ignore becomes background, the left third too."""
    label = np.where(mask == 255, 0, mask).astype(np.uint8)
    label[:, : label.shape[1] // 3] = 0
    return label


def _work(cache_dir: Path) -> None:
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.1, processes=1))


def test_png_folder_imports_good_files_and_names_the_bad_ones(tiny_voc, tmp_path):
    images = _train_images(tiny_voc)
    folder = tmp_path / "labels"
    written = {}
    for index, (image_id, mask) in enumerate(images):
        label = _pseudo_label(mask)
        path = folder / f"{image_id}.png"
        if index == 0:  # wrong size
            write_label_map(path, label[: label.shape[0] // 2])
        elif index == 1:  # 42 is no VOC class (PIL: write_label_map refuses it)
            label[0, 0] = 42
            Image.fromarray(label, mode="L").save(path)
        elif index == 2:  # aeroplane (1) is in no image of this animal subset
            label[0, 0] = 1
            write_label_map(path, label)
        elif index == 3:  # missing
            continue
        elif index == 4:  # not a PNG at all
            path.write_bytes(b"not a png")
        elif index == 5:  # grey PNG, as IRN's imageio.imsave writes
            Image.fromarray(label, mode="L").save(path)
            written[image_id] = label
        else:
            write_label_map(path, label)
            written[image_id] = label

    cache_dir = tmp_path / "cache"
    scan_id, job_id = submit_chain(cache_dir, tiny_voc, "train", [import_step(folder, "Mine")])
    _work(cache_dir)
    with connect(cache_dir, read_only=True) as con:
        job = queries.get_job(con, job_id)
        errors = {e["image_id"]: e["message"] for e in queries.image_errors(con, job_id)}
        rows = queries.label_map_rows(con, job.variant_id)
        counts = con.execute("SELECT image_id, class_id, tp, fp, fn FROM counts WHERE variant_id = ? ORDER BY ALL",
                             [job.variant_id]).fetchall()
    assert job.status == "done" and job.variant_name == "Mine"
    assert job.done == job.total == 12 and job.n_errors == 5
    ids = [image_id for image_id, _ in images]
    assert set(errors) == set(ids[:5]) and set(rows) == set(written)
    for image_id, message in errors.items():
        assert message.startswith(str(folder / f"{image_id}.png")), message
    assert "(WxH) but the image is" in errors[ids[0]]
    assert "[42] are not classes (valid: 0-20 and 255)" in errors[ids[1]]
    assert "1 (aeroplane) not among the image's labels" in errors[ids[2]]
    assert "missing" in errors[ids[3]]
    assert "cannot decode" in errors[ids[4]]

    expected = []
    masks = dict(images)
    for image_id, label in written.items():
        assert np.array_equal(read_label_map(cache_dir / rows[image_id][0]), label)
        assert rows[image_id][1] is None  # a PNG has no scores
        for class_id, (tp, fp, fn) in enumerate(confusion_counts(masks[image_id], label, VOC.num_classes).tolist()):
            if tp or fp or fn:
                expected.append((image_id, class_id, tp, fp, fn))
    assert counts == sorted(expected)


def _irn_dict(mask: np.ndarray) -> dict:
    """What IRN make_cam.py saves for a mask's classes: 0.8 on the class, 0.05 elsewhere."""
    labels = image_labels(mask, VOC)
    high_res = np.stack([np.where(mask == c, 0.8, 0.05) for c in labels]).astype(np.float32)
    strided = torch.from_numpy(high_res[:, ::4, ::4].copy())
    return {"keys": torch.tensor([c - 1 for c in labels]), "cam": strided, "high_res": high_res}


def test_npy_folder_imports_labels_and_scores_and_reimport_queues_nothing(tiny_voc, tmp_path):
    images = _train_images(tiny_voc)
    folder = tmp_path / "cams"
    folder.mkdir()
    expected = {}
    for index, (image_id, mask) in enumerate(images):
        data = _irn_dict(mask)
        if index == 0:  # random-walk scores with the background channel first: used as is
            fg = data["high_res"]
            data = {"keys": data["keys"], "rw": np.concatenate([np.full((1, *mask.shape), 0.5, np.float32), fg])}
        np.save(folder / f"{image_id}.npy", data)
        # 0.8 beats the background (0.15, or 0.5 for the rw file); ignore pixels (all 0.05) are background.
        expected[image_id] = np.where(mask == 255, 0, mask).astype(np.uint8)

    cache_dir = tmp_path / "cache"
    step = import_step(folder, "IRN CAM", format="npy")
    _, job_id = submit_chain(cache_dir, tiny_voc, "train", [step])
    _work(cache_dir)
    with connect(cache_dir, read_only=True) as con:
        job = queries.get_job(con, job_id)
        rows = queries.label_map_rows(con, job.variant_id)
    assert job.status == "done" and job.n_errors == 0 and job.variant_name == "IRN CAM"
    assert set(rows) == set(expected)
    for image_id, (label_path, scores_path) in rows.items():
        assert np.array_equal(read_label_map(cache_dir / label_path), expected[image_id])
        classes, scores = read_scores(cache_dir / scores_path)
        mask = dict(images)[image_id]
        assert classes == (0, *image_labels(mask, VOC))
        assert max(scores.shape[1:]) == 128 and scores.min() >= 0 and scores.max() <= 1
        background = 0.5 if image_id == images[0][0] else 0.15
        assert np.allclose(scores[0], background, atol=1e-3)

    # The same folder again (whatever the name) is the same, complete variant: nothing to queue.
    assert submit_chain(cache_dir, tiny_voc, "train", [step]) == []
    assert submit_chain(cache_dir, tiny_voc, "train", [import_step(folder, "other", format="npy")]) == []


def test_command_line_import(tiny_voc, tmp_path):
    folder = tmp_path / "gt"
    for image_id, mask in _train_images(tiny_voc):
        write_label_map(folder / f"{image_id}.png", mask)  # the ground truth: IoU 100
    cache_dir = tmp_path / "cache"
    command = [sys.executable, "-m", "engine", "--cache", str(cache_dir), "--root", str(tiny_voc), "import"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, str(folder), "--name", "X", "--split", "train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "queued jobs [1, 2]" in done.stdout and "mIoU=100.00" in done.stdout
    with connect(cache_dir, read_only=True) as con:
        (variant,) = queries.variants(con, dataset_id_for(tiny_voc))
    assert variant.name == "X" and variant.n_label_maps == 12
    with pytest.raises(SystemExit, match=r"no \.npy files \(it holds \.png files"):
        main(["--cache", str(cache_dir), "--root", str(tiny_voc), "import", str(folder), "--format", "npy"])
