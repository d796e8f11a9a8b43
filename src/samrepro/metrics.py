"""Pure metric functions: tensors in, floats out."""

from __future__ import annotations

import math

import torch

from samrepro.patch import Tolerance


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `out` against `ref`, in dB (inf when equal)."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref.pow(2).sum().item() / noise)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims; two empty masks count as 1."""
    a, b = a.flatten(-2).bool(), b.flatten(-2).bool()
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def best_mask(masks: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """Per prompt, the mask with the highest predicted IoU: (N, 3, H, W) -> (N, H, W); (N, 1, H, W), the one mask
    best_mask_only kept, is that mask."""
    if masks.shape[1] == 1:
        return masks[:, 0]
    idx = iou_pred.argmax(dim=1)  # N
    return masks[torch.arange(masks.shape[0], device=masks.device), idx]


def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (ref.double() - out.double()).abs().max().item() if ref.numel() else 0.0


def check_tolerance(measured: dict[str, float | None], tol: Tolerance) -> list[str]:
    """Violations of `tol` by measured values (keys: miou_agreement, miou_gt_drop, embedding_sqnr_db,
    iou_pred_max_abs, and the AMG workload's amg_matched_miou, amg_match_share); a missing or None value is not
    checked."""
    bounds = {
        "miou_agreement": (tol.agreement_miou_min, ">="),
        "miou_gt_drop": (tol.gt_miou_drop_max, "<="),
        "embedding_sqnr_db": (tol.embedding_sqnr_min_db, ">="),
        "iou_pred_max_abs": (tol.iou_pred_max_abs, "<="),
        "amg_matched_miou": (tol.amg_matched_miou_min, ">="),
        "amg_match_share": (tol.amg_match_share_min, ">="),
    }
    out = []
    for key, (bound, op) in bounds.items():
        value = measured.get(key)
        if value is None:
            continue
        ok = value >= bound if op == ">=" else value <= bound
        if not ok or math.isnan(value):
            out.append(f"{key} = {value:.6g}, needs {op} {bound:.6g}")
    return out
