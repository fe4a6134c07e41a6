"""The ground truth as a variant (oracle ``ground-truth``): the upper bound of every label set.

The final segmentation network is trained on pseudo-labels; training it on the ground-truth masks
of the same images gives the fully supervised upper bound that ISLE (Table 2) and isim (Sec. 4)
compare against. As a variant, the ground truth is trained on, exported and inspected like any
pseudo-label set; the Train page offers it as a label set. It reads the ground truth, so it is an
oracle: never a default ISLE candidate.

Out: per image the mask ``(H, W) uint8`` as is (label values, 255 = ignore kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from engine.core.dataset import read_mask
from engine.core.registry import Offer, Role, register
from engine.core.types import ImageError, LabelResult, RunContext


@dataclass(frozen=True)
class GroundTruthConfig:
    """Nothing to set: the masks are read as they are."""


@register("ground-truth", role=Role.ORACLE, config=GroundTruthConfig, title="ground truth",
          offers={Offer.QUEUE, Offer.LABEL_SET})
def run(cfg: GroundTruthConfig, ctx: RunContext) -> Iterator[LabelResult]:
    """One result per ``ctx.todo`` image: its ground-truth mask, or an error naming the file."""
    for item in ctx.todo:
        if item.mask_path is None:
            yield LabelResult(item.image_id, error=f"{item.image_path}: the image has no ground-truth mask")
            continue
        try:
            yield LabelResult(item.image_id, label=read_mask(item.mask_path, (item.height, item.width)))
        except ImageError as exc:
            yield LabelResult(item.image_id, error=str(exc))
