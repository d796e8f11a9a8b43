"""How far a patched AMG run moved from the fp32 run on the same images: the measures behind the AMG gate.

Automatic masks have no order and no prompt to pair them by, so each fp32 mask is matched to the patched run's
mask with the highest IoU (on COCO RLE, pycocotools.mask.iou). A fp32 mask the patched run lost altogether scores
its overlap with whatever mask is nearest, often 0. Ground truth has no part here: the generator's masks are not
answers to an object's prompt, so there is no mIoU against ground truth to compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samrepro.amg import AmgResult, Rle
from samrepro.metrics import sqnr_db

MATCH_IOU = 0.5  # a fp32 mask counts as found when its best match reaches this IoU
# Below this many fp32 masks, one lost mask moves the matched share by more than a tenth: the matched measures are
# shown but not gated (random ViT weights keep a handful of masks, each near a filter's threshold)
MIN_GATED_MASKS = 10
MATCHED = ("amg_matched_miou", "amg_match_share")


@dataclass
class AmgOutputs:
    """What an AMG run is compared on."""

    masks: list[list[Rle]]  # per image, per mask (COCO RLE, text counts)
    embeddings: torch.Tensor  # the first image's: 1, C, h, w fp32 (host)

    @classmethod
    def of_run(cls, out: AmgResult) -> AmgOutputs:
        return cls(out.masks, out.embeddings)

    def state(self) -> dict[str, Any]:
        """For torch.save (the fp32 step's baseline file); RLEs are plain dicts of lists and text."""
        return {"amg_masks": self.masks, "embeddings": self.embeddings}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AmgOutputs:
        return cls(state["amg_masks"], state["embeddings"])


def matched_ious(ref: list[Rle], out: list[Rle]) -> np.ndarray:
    """Per fp32 mask of one image, the IoU of its best match among `out`: (len(ref),) float64."""
    if not ref:
        return np.zeros(0)
    if not out:
        return np.zeros(len(ref))
    ious = np.asarray(mask_utils.iou(out, ref, [0] * len(ref)))  # len(out), len(ref)
    return ious.reshape(len(out), len(ref)).max(axis=0)


def mask_deviation(ref: list[list[Rle]], out: list[list[Rle]]) -> dict[str, float | None]:
    """Matched mIoU and matched share pooled over every fp32 mask of every image (None where fp32 kept no mask), the
    number of fp32 masks, and the mask-count difference per image (patched - fp32); masks per image, per mask."""
    best = [matched_ious(r, o) for r, o in zip(ref, out, strict=True)]
    best = np.concatenate(best) if best else np.zeros(0)
    found = best.size > 0
    count_diff = sum(len(o) - len(r) for r, o in zip(ref, out)) / max(len(ref), 1)
    return {
        "amg_matched_miou": float(best.mean()) if found else None,
        "amg_match_share": float((best >= MATCH_IOU).mean()) if found else None,
        "amg_mask_count_diff": count_diff,
        "amg_fp32_masks": int(best.size),
    }


def too_few_masks(masks: int | None) -> bool:
    """Whether an AMG run's fp32 step kept too few masks (fewer than MIN_GATED_MASKS) for the matched measures to be
    gated; None (a points-workload deviation has no mask count) is not too few."""
    return masks is not None and masks < MIN_GATED_MASKS


def gated(measured: dict[str, float | None]) -> dict[str, float | None]:
    """`measured` as the gate checks it: without the matched measures where `too_few_masks`."""
    if not too_few_masks(measured.get("amg_fp32_masks")):
        return measured
    return {k: v for k, v in measured.items() if k not in MATCHED}


def ungated(measured: dict[str, float | None], images: int) -> str | None:
    """Why the matched measures went ungated (the fp32 run kept no mask, or too few), None where they were gated."""
    n = measured["amg_fp32_masks"]
    if not n:
        return "the fp32 step kept no mask: matched mIoU and share not measured"
    if too_few_masks(n):
        return (
            f"the fp32 step kept {n} masks over {images} images, fewer than {MIN_GATED_MASKS}: matched mIoU and "
            "share shown, not gated (more images, or trained weights, give the gate masks to match)"
        )
    return None


def deviation(ref: AmgOutputs, out: AmgOutputs) -> dict[str, float | None]:
    """mask_deviation and the SQNR of the first image's embedding: the keys `metrics.check_tolerance` checks."""
    return mask_deviation(ref.masks, out.masks) | {"embedding_sqnr_db": sqnr_db(ref.embeddings, out.embeddings)}
