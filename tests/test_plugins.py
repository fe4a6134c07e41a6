"""The contract every registered plugin keeps: a config that survives JSON, unknown parameters
refused with the valid names, a declared role and title, and, for every plugin that trains
nothing, a run on two real VOC images that yields one well-formed result per image, in order."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache.classes import VOC
from cache.labelmaps import write_label_map, write_scores
from engine.core import registry
from engine.core.registry import Offer, Plugin, Role, inference_fields
from engine.core.types import RunContext, SourceVariant
from engine.ops.scores import downsample_scores
from tests.conftest import split_items

PLUGINS = registry.plugins()


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_config_round_trips_through_json_and_refuses_unknown_parameters(plugin: Plugin):
    if plugin.role is Role.ENSEMBLE:  # an ensemble has no default: it needs its assignment
        params = _ensemble_params(plugin.name, "v")
    elif plugin.name == "import":
        params = {"folder": "/somewhere"}
    else:
        params = {}
    cfg = plugin.make_config(params)
    stored = json.loads(json.dumps(registry.config_to_params(cfg)))
    assert plugin.make_config(stored) == cfg
    with pytest.raises(ValueError, match="valid") as refused:
        plugin.make_config({**params, "no_such_setting": 1})
    assert all(f.name in str(refused.value) for f in dataclasses.fields(plugin.config))


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_role_title_and_offers_are_declared(plugin: Plugin):
    assert isinstance(plugin.role, Role) and plugin.title.strip()
    assert plugin.offers <= set(Offer) and plugin.offers, f"{plugin.name} is offered nowhere in the app"
    # Inference fields mark the read-out of a trained model, so only training plugins have them.
    assert set(inference_fields(plugin.config)) <= {f.name for f in dataclasses.fields(plugin.config)}


def test_roles_place_plugins_in_the_app():
    names = lambda *roles, offer=None: {p.name for p in registry.plugins(*roles, offer=offer)}  # noqa: E731
    assert names(Role.REFINEMENT, offer=Offer.QUEUE) == {"dcrf", "random-walk", "svm"}  # not DeepLabV3+
    assert names(Role.FINAL) == {"deeplab"} and names(Role.ENSEMBLE) == {"isle", "isle-naive"}
    assert names(Role.ORACLE) == {"svm-oracle", "ground-truth"} and names(offer=Offer.LABEL_SET) == {"ground-truth"}
    assert "import" not in names(offer=Offer.QUEUE)


def _ensemble_params(name: str, variant: str) -> dict:
    if name == "isle":
        return {"variants": [variant] * 20, "priority": list(range(1, 21))}
    return {"variants": [variant] * 20, "ranking": list(range(1, 21)), "fallback": variant}


@pytest.fixture(scope="module")
def two_images(tmp_path_factory, voc_root: Path):
    """Two real train images, and a source variant made of their ground truth: label maps, and
    one-hot scores of background + the image's classes at 1/4 size (as a CAM variant stores)."""
    from engine.core.dataset import read_mask

    items = split_items(voc_root, "train", 2)
    store = tmp_path_factory.mktemp("source")
    for item in items:
        mask = read_mask(item.mask_path)
        write_label_map(store / f"{item.image_id}.png", mask)
        classes = (0, *item.labels)
        one_hot = np.stack([(mask == c).astype(np.float32) for c in classes])
        write_scores(store / f"{item.image_id}.npz", classes, downsample_scores(one_hot, 128))
    source = SourceVariant(lambda i: store / f"{i}.png", lambda i: store / f"{i}.npz", "src")
    return items, store, source


UNTRAINED = [p for p in PLUGINS if not inference_fields(p.config)]


def test_the_plugins_that_train_nothing_are_the_ones_without_inference_fields():
    assert {p.name for p in UNTRAINED} == {"import", "svm-oracle", "dcrf", "svm", "isle", "isle-naive",
                                           "ground-truth"}


@pytest.mark.parametrize("plugin", UNTRAINED, ids=lambda p: p.name)
def test_an_untrained_plugin_labels_two_real_images(plugin: Plugin, two_images, tmp_path: Path):
    items, store, source = two_images
    params: dict = {}
    if plugin.role is Role.ENSEMBLE:
        params = _ensemble_params(plugin.name, "src")
    elif plugin.name == "import":
        folder = tmp_path / "import"
        folder.mkdir()
        for item in items:
            shutil.copy(store / f"{item.image_id}.png", folder)
        params = {"folder": str(folder)}
    ctx = RunContext(classes=VOC, items=items, todo=items, workdir=tmp_path, processes=1,
                     source=source if not plugin.role.starts_chain else None, variants=lambda v: source)
    results = list(plugin.run(plugin.make_config(params), ctx))
    assert [r.image_id for r in results] == [item.image_id for item in items]
    for result, item in zip(results, items):
        assert result.error is None, result.error
        assert result.label.shape == (item.height, item.width) and result.label.dtype == np.uint8
        assert set(np.unique(result.label)) <= {0, *item.labels, 255}
        if result.scores is not None:
            assert result.scores.ndim == 3 and result.scores.shape[0] == len(result.score_classes)
