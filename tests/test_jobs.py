"""Chains as variants: identity, naming, and re-submission (engine/jobs.py)."""

from __future__ import annotations

import json

import pytest

from engine.core.chains import Step, chain_variants


def test_chain_prefixes_are_variants_keyed_by_steps_and_parameters():
    cam, crf = chain_variants("d", [Step("cam"), Step("dcrf")])
    assert (cam.name, crf.name) == ("CAM", "CAM → dCRF")
    assert crf.source_id == cam.id and crf.method == "cam"
    assert [s["name"] for s in json.loads(crf.to_row()["steps"])] == ["cam", "dcrf"]
    # Same chain, same ids; a changed parameter changes the id of its step and of what follows.
    assert [r.id for r in chain_variants("d", [Step("cam"), Step("dcrf")])] == [cam.id, crf.id]
    cam5, crf5 = chain_variants("d", [Step("cam"), Step("dcrf", {"iters": 5})])
    assert cam5.id == cam.id and crf5.id != crf.id
    # Non-default parameters are shown in the name, so two dCRF variants are told apart.
    assert crf5.name == "CAM → dCRF (iters=5)"
    # A user title replaces the plugin title and does not change the identity.
    named, = chain_variants("d", [Step("cam", title="my CAM")])
    assert named.name == "my CAM" and named.id == cam.id


def test_misplaced_or_unknown_steps_are_refused():
    with pytest.raises(ValueError, match="must be a method"):
        chain_variants("d", [Step("dcrf")])
    with pytest.raises(ValueError, match="unknown parameter"):
        chain_variants("d", [Step("cam", {"epoch": 3})])
    with pytest.raises(KeyError, match="valid"):
        chain_variants("d", [Step("nope")])
