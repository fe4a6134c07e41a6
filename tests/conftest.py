"""Shared fixtures: small real samples of the bundled VOC 2012 subset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VOC_ROOT = (REPO / ".." / "shared" / "data" / "voc2012-animals").resolve()


def _split_ids(split: str) -> list[str]:
    return (VOC_ROOT / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def make_voc_copy(dest: Path, splits: dict[str, list[str]]) -> Path:
    """A VOCdevkit-layout folder at ``dest`` holding copies of the given real images and masks."""
    (dest / "JPEGImages").mkdir(parents=True)
    (dest / "SegmentationClassAug").mkdir()
    (dest / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, ids in splits.items():
        for image_id in ids:
            shutil.copy(VOC_ROOT / "JPEGImages" / f"{image_id}.jpg", dest / "JPEGImages")
            shutil.copy(VOC_ROOT / "SegmentationClassAug" / f"{image_id}.png", dest / "SegmentationClassAug")
        (dest / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return dest


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """The bundled real data (read-only)."""
    assert VOC_ROOT.is_dir(), f"bundled data missing at {VOC_ROOT}"
    return VOC_ROOT


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """A writable VOCdevkit with 12 real train and 4 real val images."""
    return make_voc_copy(tmp_path / "voc", {"train": _split_ids("train")[:12], "val": _split_ids("val")[:4]})
