"""fold_attn: encoder attention with the rel-pos bias folded into the head dim, then mask-free SDPA (beyond the blog).

The decomposed bias is a sum of two lookups, rel_h[q, key row] + rel_w[q, key column], and so a dot product:
append the two terms (divided by the softmax scale) to each query and a one-hot of the key's row and column to each
key, and scale * q'.k' = scale * q.k + bias, exactly. SDPA then needs no mask, so PyTorch may pick cuDNN, which
the H100 sweep measured fastest for vit_h's global blocks: 7.0 ms against 9.5 for the Triton kernel and 17.5 for
cuDNN with the bias built (reports/2026-11-21-h100-attention-sweep-profiled-waterfalls and
reports/2026-11-21-h100-decoder-compile-fp8-fix-and-peer; bs16, one layer, q'/k' construction included). For
windows it lost (3.1 vs 1.4-1.6 ms: 196 keys do not amortize the wider head), hence `blocks`, which picks the blocks
it takes over; stacked after triton_attn it replaces the kernel on those blocks only. v keeps its head dim.
In the compiled vit_h encoder on the H100 (reports/2026-11-21-h100-fold_attn-split-windows-and-peer, bs16) a global
layer took 5.2 ms against 10.4 for the padded kernel, inductor fusing the q'/k' construction: 57.7 -> 61.6 img/s
end to end. On a 2-core CPU (bf16, eager) a vit_b global layer took 1.50 s folded against 0.50 s for sdpa with the
bias: a CUDA optimization.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam, image_encoder

from samrepro.patch import Patch, PatchConfig, PatchError, Tolerance, Undo
from samrepro.patches._attention import merge_heads, rel_terms, split_heads
from samrepro.registry import register_patch

BLOCKS = ("global", "windowed", "all")


@dataclass(frozen=True)
class FoldAttnConfig(PatchConfig):
    """blocks: which encoder blocks fold their bias (global: window_size 0)."""

    blocks: str = "global"

    def __post_init__(self) -> None:
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {BLOCKS}, got {self.blocks!r}")

    def takes(self, block: image_encoder.Block) -> bool:
        return self.blocks == "all" or (self.blocks == "global") == (block.window_size == 0)


def fold_rel_pos(
    q: torch.Tensor, k: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q', k' with scale * q'.k' = scale * q.k + rel_h[query, key // k_w] + rel_w[query, key % k_w].

    q, k: (B, heads, N, d), keys in row-major (k_h, k_w) grid order; rel_h: (B, heads, N, k_h); rel_w: (B, heads, N,
    k_w). Returns (B, heads, N, d') each, d' = d + k_h + k_w rounded up to a multiple of 8 with zeros.
    """
    *lead, n, d = k.shape
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    key = torch.arange(n, device=k.device)  # N
    row = key[:, None] // k_w == torch.arange(k_h, device=k.device)  # N, k_h (no F.one_hot: it syncs to check)
    col = key[:, None] % k_w == torch.arange(k_w, device=k.device)  # N, k_w
    onehot = torch.cat([row, col], dim=-1).to(k.dtype).expand(*lead, n, k_h + k_w)  # B, heads, N, k_h + k_w
    pad = -(d + k_h + k_w) % 8
    q2 = F.pad(torch.cat([q, rel_h / scale, rel_w / scale], dim=-1), (0, pad))  # B, heads, N, d'
    k2 = F.pad(torch.cat([k, onehot], dim=-1), (0, pad))  # B, heads, N, d'
    return q2, k2


def encoder_attention_forward(self: image_encoder.Attention, x: torch.Tensor) -> torch.Tensor:
    """Upstream `image_encoder.Attention.forward` with the bias folded into q and k and mask-free SDPA."""
    H, W = x.shape[1:3]  # a window's grid in windowed blocks
    q, k, v = split_heads(self, x)  # B, heads, HW, d
    rel_h, rel_w = rel_terms(self, q, (H, W))  # B, heads, H, W, H|W
    q2, k2 = fold_rel_pos(q, k, rel_h.flatten(2, 3), rel_w.flatten(2, 3), self.scale)  # B, heads, HW, d'
    out = F.scaled_dot_product_attention(q2, k2, v, scale=self.scale)  # B, heads, HW, d
    return merge_heads(self, out, (H, W))  # B, H, W, C


def _apply(sam: Sam, config: FoldAttnConfig, undo: Undo) -> None:
    layers = [b for b in sam.image_encoder.modules() if isinstance(b, image_encoder.Block) and config.takes(b)]
    if not layers:
        raise PatchError(f"fold_attn(blocks={config.blocks!r}) found no such encoder blocks")
    if any(not b.attn.use_rel_pos for b in layers):
        raise PatchError("fold_attn folds the rel-pos bias, but some encoder blocks have use_rel_pos=False")
    for block in layers:
        undo.setattr(block.attn, "forward", MethodType(encoder_attention_forward, block.attn))
        if "forward" in vars(block):  # triton_attn's windowed blocks bypass attn.forward: upstream's flow again
            undo.setattr(block, "forward", MethodType(image_encoder.Block.forward, block))


PATCH = register_patch(
    Patch(
        name="fold_attn",
        summary="encoder attention with the rel-pos bias folded into q and k, then mask-free SDPA (global blocks)",
        config_cls=FoldAttnConfig,
        apply_fn=_apply,
        # Exact in real arithmetic; in floating point rel/scale is rounded once and SDPA sums bias and q.k in its
        # own order. fp32 CPU (torch 2.11, 2 threads): blocks <= 1.3e-7 relative error against upstream
        # (tests/test_fold_attn.py); tiny model, 48 synthetic images: SQNR 136.9 dB, agreement 1.0, |dIoU pred|
        # 6e-7. sdpa's bounds (>= 50 dB margin). In bf16 the error is bf16 attention's, inside bf16's budget.
        tolerance=Tolerance(
            agreement_miou_min=0.995, gt_miou_drop_max=0.002, embedding_sqnr_min_db=80.0, iou_pred_max_abs=1e-4
        ),
    )
)
