"""Helpers shared by the encoder-attention patch tests: seeded generators, relative error, rel-pos blocks."""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder as ie


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |ref - out| over max |ref|, in float64."""
    ref, out = ref.double(), out.double()
    return ((ref - out).abs().max() / ref.abs().max()).item()


def randomize_rel_pos(attn: ie.Attention, seed: int = 0) -> ie.Attention:
    """Upstream zero-initialises the rel-pos tables; random ones make the bias matter."""
    with torch.no_grad():
        attn.rel_pos_h.copy_(torch.randn(attn.rel_pos_h.shape, generator=gen(seed)) * 0.5)
        attn.rel_pos_w.copy_(torch.randn(attn.rel_pos_w.shape, generator=gen(seed + 1)) * 0.5)
    return attn


def rel_pos_block(dim: int, heads: int, window: int, hw: tuple[int, int], seed: int = 0) -> ie.Block:
    """An upstream encoder block with rel-pos on and random tables; window 0 is a global block over hw."""
    size = (window, window) if window else hw
    blk = ie.Block(dim=dim, num_heads=heads, use_rel_pos=True, window_size=window, input_size=size).eval()
    randomize_rel_pos(blk.attn, seed)
    return blk
