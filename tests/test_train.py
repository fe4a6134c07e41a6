"""The final DeepLabV3+ training on real images: the ground truth as a label set, resume from a
checkpoint, cancel and resume through the worker, evaluation and test-time dCRF as variants,
predictions on another split without retraining."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

from cache.classes import VOC
from cache import queries
from cache.db import connect
from cache.labelmaps import read_label_map
from engine.core.chains import Step, chain_variants, dataset_id_for
from engine.core.dataset import read_mask
from engine.core.types import Cancelled, RunContext, SourceVariant
from engine.final.deeplab import FAMILY, DeepLabConfig, label_from_probs, run, train
from engine.runtime.jobs import submit_chain
from engine.runtime.trainings import submit_training, trainings
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import Reports, job_row, kill_when, split_items, worker_process

TINY = {"epochs": 1, "batch_size": 4, "crop_size": 128, "resize_long": [128, 192], "val_images": 2,
        "checkpoint_every": 2}


def _gt_source(items) -> SourceVariant:
    """The ground-truth masks of ``items`` as a label-only source variant."""
    paths = {it.image_id: it.mask_path for it in items}
    return SourceVariant(lambda i: paths[i], lambda i: None, "gt-test")


def _ctx(tmp_path, train_items, val_items, report=None) -> RunContext:
    return RunContext(classes=VOC, items=val_items, todo=val_items, workdir=tmp_path / "work", source=_gt_source(train_items),
                      source_items=train_items, models=tmp_path / "models", processes=1,
                      report=report or (lambda *a: None))


def test_label_from_probs_takes_the_argmax_and_keeps_likely_classes():
    probs = np.zeros((21, 2, 3), np.float32)
    probs[0] = 0.9
    probs[8, 0, 0], probs[0, 0, 0] = 0.8, 0.1  # cat wins one pixel
    probs[12, 1, 2] = 0.06  # dog never wins but reaches keep_prob
    probs[15, 1, 1] = 0.01  # person stays below it
    result = label_from_probs(probs, "x", keep_prob=0.05, max_side=128, classes=VOC)
    np.testing.assert_array_equal(result.label, [[8, 0, 0], [0, 0, 0]])
    assert result.score_classes == (0, 8, 12) and result.scores.shape == (3, 2, 3)


def test_a_cancelled_training_resumes_from_its_checkpoint_to_the_same_weights(voc_root, tmp_path):
    train_items, val_items = split_items(voc_root, "train", 12), split_items(voc_root, "val", 2)
    cfg = DeepLabConfig(**{**TINY, "resize_long": (128, 192)})  # 3 steps of 4 images
    reports = Reports(cancel_at=("train", 2))
    with pytest.raises(Cancelled):
        train(cfg, _ctx(tmp_path / "a", train_items, val_items, reports))
    model_dir = next((tmp_path / "a" / "models" / FAMILY).iterdir())
    assert (model_dir / f"{FAMILY}_checkpoint.pt").is_file()  # written at step 2
    resumed_reports = Reports()
    resumed = train(cfg, _ctx(tmp_path / "a", train_items, val_items, resumed_reports))
    assert resumed_reports.done("train") == [3]  # only the last step was run again
    whole = train(cfg, _ctx(tmp_path / "b", train_items, val_items))
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_predictions_are_label_maps_of_the_image_size_with_scores(voc_root, tmp_path):
    train_items, val_items = split_items(voc_root, "train", 8), split_items(voc_root, "val", 2)
    results = list(run(DeepLabConfig(**{**TINY, "resize_long": (128, 192)}), _ctx(tmp_path, train_items, val_items)))
    assert [r.image_id for r in results] == [it.image_id for it in val_items]
    for result, item in zip(results, val_items):
        assert result.label.shape == (item.height, item.width) and result.label.dtype == np.uint8
        assert result.score_classes[0] == 0 and result.scores.shape[0] == len(result.score_classes)


def test_training_from_the_ground_truth_through_the_worker(tiny_voc, tmp_path):
    cache_dir = tmp_path / "cache"
    queued = submit_training(cache_dir, tiny_voc, "gt", TINY, then=[Step("dcrf")])
    assert len(queued.job_ids) == 4  # scan, ground truth on train, DeepLabV3+ on val, dCRF on val

    stop = {"at": ("train", 2)}

    def cancel_once(job, stage, done, total):
        if (stage, done) == stop["at"]:
            stop["at"] = None
            with connect(cache_dir) as con:
                queries.request_cancel(con, [job.id])

    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1, flush_seconds=0.0), cancel_once)
    dataset_id = dataset_id_for(tiny_voc)
    with connect(cache_dir, read_only=True) as con:
        statuses = {j.id: j.status for j in queries.recent_jobs(con)}
        labelled = queries.labelled_in_split(con, dataset_id, "val")
        curve = queries.train_log(con, queued.model_variant_id)
    assert [statuses[i] for i in queued.job_ids] == ["done", "done", "cancelled", "failed"]
    assert queued.model_variant_id not in labelled  # cancelled during training: no prediction recorded
    assert [r["step"] for r in curve if r["name"] == "loss"] == [1, 2]

    # The ground-truth variant is the masks themselves.
    with connect(cache_dir, read_only=True) as con:
        rows = queries.label_map_rows(con, queued.label_set_id)
        items = {r.image_id: r for r in queries.usable_images(con, dataset_id, "train")}
    assert len(rows) == 12
    for image_id, (path, _) in list(rows.items())[:3]:
        np.testing.assert_array_equal(read_label_map(cache_dir / path), read_mask(items[image_id].mask_path))

    again = submit_training(cache_dir, tiny_voc, "gt", TINY, then=[Step("dcrf")])  # resumes from the checkpoint
    assert again.model_variant_id == queued.model_variant_id and len(again.job_ids) == 2
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(cache_dir, read_only=True) as con:
        found = trainings(con, dataset_id, "val")
        curve = queries.train_log(con, queued.model_variant_id)
    assert [r["step"] for r in curve if r["name"] == "loss"] == [1, 2, 3]  # 12 images / batch 4
    assert [r["step"] for r in curve if r["name"] == "val_miou"] == [3]
    (training,) = found
    assert training.label_set == "ground truth" and training.images == 4
    assert training.miou is not None and training.refined[0].miou is not None
    assert training.params["epochs"] == 1
    assert submit_training(cache_dir, tiny_voc, "gt", TINY, then=[Step("dcrf")]).job_ids == []

    # Predicting the train split is the same variant on another split, with the same model:
    # no second training (the curve is unchanged) and no second model.
    predict = Step("deeplab", TINY)
    submit_chain(cache_dir, tiny_voc, "train", [predict], queued.label_set_id)
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, processes=1))
    with connect(cache_dir, read_only=True) as con:
        predicted = chain_variants(dataset_id, [predict], queries.get_variant(con, queued.label_set_id))[0].id
        assert predicted == queued.model_variant_id
        assert queries.labelled_in_split(con, dataset_id, "train")[predicted] == 12
        assert queries.train_log(con, predicted) == curve
    assert len(list((cache_dir / "models" / FAMILY).iterdir())) == 1


def test_unknown_label_sets_and_bad_settings_are_refused(baseline_cache, tiny_voc, tmp_path):
    with pytest.raises(KeyError, match="no cache at"):
        submit_training(tmp_path / "cache", tiny_voc, "0123456789ab", TINY)
    cache_dir, root = baseline_cache
    with pytest.raises(KeyError, match="no variant"):
        submit_training(cache_dir, root, "0123456789ab", TINY)
    with pytest.raises(KeyError, match="no saved ISLE assignment"):
        submit_training(cache_dir, root, "isle:nope", TINY)
    with pytest.raises(ValueError, match="batch_size"):
        submit_training(tmp_path / "cache", tiny_voc, "gt", {"batch_size": 1})
    assert not (tmp_path / "cache").exists()  # refused before the ground-truth job was queued


def test_other_encoders_load_a_local_weights_file_or_fail_clearly(tmp_path):
    from engine.final.deeplab import build_net

    random_init = build_net(DeepLabConfig(encoder="resnet18", seed=1), VOC.num_classes)
    assert not random_init.pretrained
    weights = tmp_path / "resnet18_encoder.pt"
    torch.save(random_init.seg.encoder.state_dict(), weights)
    loaded = build_net(DeepLabConfig(encoder="resnet18", encoder_weights=str(weights), seed=2), VOC.num_classes)
    assert loaded.pretrained
    for name, value in random_init.seg.encoder.state_dict().items():
        torch.testing.assert_close(loaded.seg.encoder.state_dict()[name], value, msg=name)
    with pytest.raises(ValueError, match="is not a file"):
        DeepLabConfig(encoder="resnet18", encoder_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown encoder"):
        DeepLabConfig(encoder="no-such-encoder")


def test_a_training_killed_with_its_worker_resumes_from_the_checkpoint(baseline_cache, tmp_path):
    cache_dir, root = baseline_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    with connect(copy, read_only=True) as con:
        cam = queries.variants(con, dataset_id_for(root))[0].id
    slow = {**TINY, "batch_size": 2, "epochs": 3, "val_images": 1}  # 8 images: 4 steps an epoch, 12 in all
    queued = submit_training(copy, root, cam, slow)
    (job,) = queued.job_ids
    state = kill_when(worker_process(copy), copy, job, "train", 5)
    killed_at = time.time()
    assert state.status == "running" and state.done < 12
    restarted = worker_process(copy, "--until-idle")
    assert restarted.wait(timeout=300) == 0, restarted.stderr.read()
    assert job_row(copy, job).status == "done" and job_row(copy, job).attempts == 2
    with connect(copy, read_only=True) as con:
        curve = queries.train_log(con, queued.model_variant_id)
    loss = {r["step"]: r["created_at"] for r in curve if r["name"] == "loss"}
    assert sorted(loss) == list(range(1, 13))
    assert [r["step"] for r in curve if r["name"] == "val_miou"] == [4, 8, 12]
    # Steps up to the checkpoint (every 2 steps) were not run again after the restart.
    assert all(loss[step] < killed_at for step in range(1, 5))


def test_the_aspp_pooling_branch_uses_group_norm_by_default():
    from engine.final.deeplab import build_net

    pooling = build_net(DeepLabConfig(), VOC.num_classes).seg.decoder.aspp[0].convs[-1]
    assert isinstance(pooling[2], torch.nn.GroupNorm) and pooling[2].num_groups == 32
    batch = build_net(DeepLabConfig(pool_norm="batch"), VOC.num_classes).seg.decoder.aspp[0].convs[-1]
    assert isinstance(batch[2], torch.nn.BatchNorm2d)
    # GroupNorm normalises each image alone: an image's output does not depend on its batch.
    pooling.train()
    features = torch.randn(2, 320, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(pooling(features)[:1], pooling(features[:1]))
    with pytest.raises(ValueError, match="pool_norm"):
        DeepLabConfig(pool_norm="layer")
