"""Decomposed relative-position terms of SAM's encoder attention, shared by the attention patches.

Upstream `add_decomposed_rel_pos` adds the terms straight into a materialized attention map; the
rewrites (SDPA, a Triton kernel, FlexAttention) need the two terms themselves, so they live here.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder


def rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The height and width terms of upstream `add_decomposed_rel_pos`, from the unscaled q.

    Args:
        q: (..., q_h * q_w, d) queries, *not* multiplied by the softmax scale (as upstream).
        rel_pos_h: (Lh, d) height table; rel_pos_w: (Lw, d) width table.
        q_size: (q_h, q_w); k_size: (k_h, k_w).

    Returns:
        rel_h: (..., q_h, q_w, k_h), added to every key in key row k_h.
        rel_w: (..., q_h, q_w, k_w), added to every key in key column k_w.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    lead, dim = q.shape[:-2], q.shape[-1]
    r_q = q.reshape(-1, q_h, q_w, dim)  # N, q_h, q_w, d  (N = prod(lead)), upstream's layout
    if q_size == k_size and tables_fit(rel_pos_h, rel_pos_w, q_size):
        rel_h, rel_w = _offset_terms(r_q, rel_pos_h, rel_pos_w)
    else:
        # Looked up on the module at call time: the sync_free patch swaps in a device-side version.
        Rh = image_encoder.get_rel_pos(q_h, k_h, rel_pos_h)  # q_h, k_h, d
        Rw = image_encoder.get_rel_pos(q_w, k_w, rel_pos_w)  # q_w, k_w, d
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # N, q_h, q_w, k_h
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # N, q_h, q_w, k_w
    return rel_h.reshape(*lead, q_h, q_w, k_h), rel_w.reshape(*lead, q_h, q_w, k_w)


def tables_fit(rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether the tables serve a (h, w) grid without interpolation: 2 h - 1 and 2 w - 1 rows."""
    return (len(rel_pos_h), len(rel_pos_w)) == (2 * size[0] - 1, 2 * size[1] - 1)


def _offset_terms(
    r_q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same terms when q and k share one grid and the tables need no interpolation, so that upstream's
    Rh[i, j] = rel_pos_h[i - j + q_h - 1]: one GEMM of q against both tables, then each query picks its offsets.
    Upstream's two einsums ran as batched matmuls over q_h (or q_w) with copies around them: 22 of 198 ms per batch
    in vit_h's fp8_fused step on the H100 (reports/2026-11-21-h100-fp8_fused-and-relgemm)."""
    n, q_h, q_w, _ = r_q.shape
    table = torch.cat([rel_pos_h, rel_pos_w]).to(r_q.dtype)  # 2 q_h - 1 + 2 q_w - 1, d
    per_offset = torch.nn.functional.linear(r_q, table)  # N, q_h, q_w, 2 q_h - 1 + 2 q_w - 1
    by_h, by_w = per_offset.split([2 * q_h - 1, 2 * q_w - 1], dim=-1)
    rows, cols = (torch.arange(size, device=r_q.device) for size in (q_h, q_w))
    offset_h = rows[:, None] - rows[None, :] + q_h - 1  # q_h, k_h
    offset_w = cols[:, None] - cols[None, :] + q_w - 1  # q_w, k_w
    rel_h = by_h.gather(-1, offset_h[None, :, None, :].expand(n, q_h, q_w, q_h))  # N, q_h, q_w, k_h
    rel_w = by_w.gather(-1, offset_w[None, None, :, :].expand(n, q_h, q_w, q_w))  # N, q_h, q_w, k_w
    return rel_h, rel_w


def rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """The materialized additive bias: (..., q_h, q_w, k_h) and (..., q_h, q_w, k_w) -> (..., q_h*q_w, k_h*k_w)."""
    *lead, q_h, q_w, k_h = rel_h.shape
    k_w = rel_w.shape[-1]
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # ..., q_h, q_w, k_h, k_w
    return bias.reshape(*lead, q_h * q_w, k_h * k_w)
