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
    # Looked up on the module at call time: the sync_free patch swaps in a device-side version.
    Rh = image_encoder.get_rel_pos(q_h, k_h, rel_pos_h)  # q_h, k_h, d
    Rw = image_encoder.get_rel_pos(q_w, k_w, rel_pos_w)  # q_w, k_w, d
    lead, dim = q.shape[:-2], q.shape[-1]
    r_q = q.reshape(-1, q_h, q_w, dim)  # N, q_h, q_w, d  (N = prod(lead)), upstream's layout
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # N, q_h, q_w, k_h
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # N, q_h, q_w, k_w
    return rel_h.reshape(*lead, q_h, q_w, k_h), rel_w.reshape(*lead, q_h, q_w, k_w)


def rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """The materialized additive bias: (..., q_h, q_w, k_h) and (..., q_h, q_w, k_w) -> (..., q_h*q_w, k_h*k_w)."""
    *lead, q_h, q_w, k_h = rel_h.shape
    k_w = rel_w.shape[-1]
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # ..., q_h, q_w, k_h, k_w
    return bias.reshape(*lead, q_h * q_w, k_h * k_w)
