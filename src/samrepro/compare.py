"""How far a patched run moved from its fp32 reference: the one measurement behind every accuracy gate.

The runner's steps (against the fp32 step's stored outputs) and the equivalence gates of the tests (against an
fp32 twin run side by side) both reduce a run to `Outputs` and measure the pair with `deviation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from samrepro.bench import BenchResult, Masks
from samrepro.metrics import mask_iou, max_abs, sqnr_db


@dataclass
class Outputs:
    """What a run is compared on."""

    masks: list[Masks]  # per image: the best mask of each prompt, N, H, W bool (bit-packed on the host)
    iou_preds: list[torch.Tensor]  # per image: N, 3 fp32 (host)
    embeddings: torch.Tensor  # n, C, h, w fp32 (host): the images whose embeddings were kept
    miou_gt: float | None  # against ground truth; None without it

    @classmethod
    def of_bench(cls, out: BenchResult) -> Outputs:
        return cls(out.best_masks, out.iou_preds, out.embeddings, out.miou_gt)

    def state(self) -> dict[str, Any]:
        """For torch.save (the fp32 step's baseline file)."""
        return {
            "shapes": [list(m.shape) for m in self.masks],
            "bits": [m.bits for m in self.masks],
            "iou_preds": self.iou_preds,
            "embeddings": self.embeddings,
            "miou_gt": self.miou_gt,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Outputs:
        masks = [Masks(tuple(shape), bits) for shape, bits in zip(state["shapes"], state["bits"], strict=True)]
        return cls(masks, state["iou_preds"], state["embeddings"], state["miou_gt"])


def deviation(ref: Outputs, out: Outputs) -> dict[str, float | None]:
    """Agreement of the best masks (mean IoU over every prompt), SQNR of the embeddings, the largest IoU-prediction
    difference and the ground-truth mIoU lost; the keys `metrics.check_tolerance` checks."""
    ious = [mask_iou(o.unpack(), r.unpack()) for o, r in zip(out.masks, ref.masks, strict=True)]
    ious = torch.cat(ious) if ious else torch.zeros(0)  # one IoU per prompt
    return {
        "miou_agreement": ious.mean().item() if ious.numel() else None,
        "embedding_sqnr_db": sqnr_db(ref.embeddings, out.embeddings),
        "iou_pred_max_abs": max((max_abs(r, o) for r, o in zip(ref.iou_preds, out.iou_preds)), default=0.0),
        "miou_gt": out.miou_gt,
        "miou_gt_drop": None if ref.miou_gt is None or out.miou_gt is None else ref.miou_gt - out.miou_gt,
    }
