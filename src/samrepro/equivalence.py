"""Compare a patched model with its fp32 twin on the same inputs."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from samrepro import workload
from samrepro.bench import Masks
from samrepro.compare import Outputs, deviation
from samrepro.metrics import mask_iou
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


def outputs(sam: Sam, samples: list[Sample], batch_size: int) -> Outputs:
    """`sam`'s outputs on `samples`, every image's embedding kept."""
    emb, preds = run_chunked(sam, samples, batch_size)
    masks = [Masks.pack(p.best) for p in preds]
    return Outputs(masks, [p.iou_pred.float().cpu() for p in preds], emb, gt_miou(preds, samples))


def compare(ref: Sam, patched: Sam, samples: list[Sample], batch_size: int | None = None) -> dict[str, float | None]:
    """Deviation of `patched` from `ref` (the fp32 model), pooled over every prompt of `samples`."""
    batch_size = batch_size or len(samples)
    return deviation(outputs(ref, samples, batch_size), outputs(patched, samples, batch_size))
