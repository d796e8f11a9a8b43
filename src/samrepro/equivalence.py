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


def run_chunked(sam: Sam, samples: list[Sample], batch_size: int) -> tuple[torch.Tensor, list[workload.Prediction]]:
    """workload.run over fixed-size batches (compiled shapes stay static): all embeddings, all predictions."""
    embs, preds = [], []
    for i in range(0, len(samples), batch_size):
        emb, p = workload.run(sam, samples[i : i + batch_size])
        embs.append(emb.float().cpu())
        preds += p
    return torch.cat(embs), preds


def compare(ref: Sam, patched: Sam, samples: list[Sample], batch_size: int | None = None) -> dict[str, float | None]:
    """Deviation of `patched` from `ref` (the fp32 model), pooled over every prompt of `samples`."""
    batch_size = batch_size or len(samples)
    ref_emb, ref_preds = run_chunked(ref, samples, batch_size)
    emb, preds = run_chunked(patched, samples, batch_size)
    ious = [mask_iou(p.best.cpu(), r.best.cpu()) for p, r in zip(preds, ref_preds) if r.best.numel()]
    iou_dev = [max_abs(r.iou_pred.cpu(), p.iou_pred.cpu()) for p, r in zip(preds, ref_preds)]
    ref_gt, gt = gt_miou(ref_preds, samples), gt_miou(preds, samples)
    return {
        "embedding_sqnr_db": sqnr_db(ref_emb, emb),
        "miou_agreement": torch.cat(ious).mean().item() if ious else None,
        "iou_pred_max_abs": max(iou_dev, default=0.0),
        "miou_gt": gt,
        "miou_gt_drop": None if gt is None else ref_gt - gt,
    }
