"""What the encoder-attention patches (sdpa, triton_attn, flex_attn, fold_attn) keep of upstream
`image_encoder.Attention.forward`: the qkv projection split into heads, the rel-pos terms, and the output
projection. Each patch replaces only the attention in between.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder

from samrepro.patches._relpos import rel_pos_terms

# Patches that run every encoder attention through one fused kernel of their own (triton_attn, flex_attn): stacked,
# the later would silently replace the earlier. sdpa and fold_attn stay stackable with them (the plans use that).
KERNEL_SLOT = "encoder attention kernel"


def split_heads(attn: image_encoder.Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of x (B, H, W, C; B = batch * windows for windowed blocks), each (B, heads, H*W, head_dim):
    strided views of upstream's one qkv output, last dim contiguous."""
    B, H, W, _ = x.shape
    qkv = attn.qkv(x).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3, B, heads, HW, head_dim
    return qkv.unbind(0)  # B, heads, HW, head_dim each


def rel_terms(
    attn: image_encoder.Attention, q: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's decomposed rel-pos terms from the unscaled q (B, heads, H*W, head_dim), keys on the queries' own
    (H, W) grid: rel_h (B, heads, H, W, H) and rel_w (B, heads, H, W, W)."""
    return rel_pos_terms(q, attn.rel_pos_h, attn.rel_pos_w, size, size)


def merge_heads(attn: image_encoder.Attention, out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The output projection of the attention output (B, heads, H*W, head_dim) -> (B, H, W, C), channels
    heads-major as upstream."""
    return attn.proj(out.transpose(1, 2).reshape(out.shape[0], *size, -1))  # B, H, W, C
