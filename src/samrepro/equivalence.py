"""Compare a patched model with its fp32 twin on the same inputs."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from samrepro import workload
from samrepro.metrics import mask_iou, max_abs, sqnr_db
from samrepro.workload import Sample


def gt_miou(preds: list[workload.Prediction], samples: list[Sample]) -> float | None:
    """Mean IoU of each prompt's best mask against its ground truth (None without GT)."""
    if any(s.gt_masks is None for s in samples):
        return None
    ious = [mask_iou(p.best.cpu(), torch.as_tensor(s.gt_masks)) for p, s in zip(preds, samples) if s.num_prompts]
    return torch.cat(ious).mean().item() if ious else None


def compare(ref: Sam, patched: Sam, samples: list[Sample]) -> dict[str, float | None]:
    """Measured deviation of `patched` from `ref` (the fp32 model) on `samples`."""
    ref_emb, ref_preds = workload.run(ref, samples)
    emb, preds = workload.run(patched, samples)
    ious = [mask_iou(p.best.cpu(), r.best.cpu()) for p, r in zip(preds, ref_preds) if r.best.numel()]
    iou_dev = [max_abs(r.iou_pred.cpu(), p.iou_pred.cpu()) for p, r in zip(preds, ref_preds)]
    ref_gt, gt = gt_miou(ref_preds, samples), gt_miou(preds, samples)
    return {
        "embedding_sqnr_db": sqnr_db(ref_emb.float().cpu(), emb.float().cpu()),
        "miou_agreement": torch.cat(ious).mean().item() if ious else None,
        "iou_pred_max_abs": max(iou_dev, default=0.0),
        "miou_gt": gt,
        "miou_gt_drop": None if gt is None else ref_gt - gt,
    }
