"""triton_attn: encoder attention through samrepro's fused rel-pos flash-attention kernel (SAF step 6).

Each image-encoder Attention instance gets its own forward: the decomposed rel-pos terms come from the unscaled q
(`_relpos.rel_pos_terms`, as upstream and sdpa do) and go, unsummed, into `samrepro::rel_pos_attention`, which adds
them per key block inside the kernel, so no (HW, HW) bias is ever built. Windowed blocks (`window_tables`) hand the
kernel the position tables instead (`samrepro::rel_pos_attention_tables`), and it computes the terms itself; their
blocks skip the window partition too (`image_windows`: `samrepro::rel_pos_attention_windows`). Unlike
SAF: any batch size (bs1 too), any key block size, vit_h's head dim 80 without padding copies, and no fallback:
every call runs the kernel and is counted in `samrepro.kernels.COUNTERS`; inputs the kernel cannot take raise. The
mask decoder is left alone (stack `sdpa` for it). The kernel module, and so Triton, is imported when the patch is
applied, not at package import.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
from segment_anything.modeling import Sam, image_encoder
from torch import nn

from samrepro.patch import Patch, PatchConfig, PatchError, Requires, Tolerance, Undo
from samrepro.patches._attention import KERNEL_SLOT, merge_heads, rel_terms, split_heads
from samrepro.patches._relpos import tables_fit
from samrepro.registry import register_patch


@dataclass(frozen=True)
class TritonAttnConfig(PatchConfig):
    """Kernel launch parameters for every call; 0 takes the kernel's table (`default_launch`), stepped down where it
    does not fit the GPU's shared memory (`fit_launch`). Given block sizes or stages that cannot fit raise."""

    block_m: int = 0  # queries per program
    block_n: int = 0  # keys per loop step; any value is correct, whatever the key grid's width
    num_warps: int = 0
    num_stages: int = 0
    bias: str = ""  # "gather" (per-key loads) or "onehot" (tensor-core dots); "" takes the table's
    # Blocks split a head dim that is not a power of two (vit_h: 80 = 64 + 16) instead of padding it (to 128);
    # power-of-two head dims (vit_b, vit_l: 64) are never split. H100, vit_h bs16: windows 1.34 ms split vs 1.60
    # padded in the full model (reports/2026-11-21-h100-fold_attn-split-windows-and-peer); with the one-hot-bias
    # kernel the global blocks gain too, 4.78 vs 5.57 ms in the microbenchmark
    # (reports/2026-11-21-h100-onehot-kernel-and-peer), where the first split kernel lost (10.8 vs 9.5;
    # reports/2026-11-21-h100-vit_h-splitkernel-bs16-noise8).
    split_windows: bool = True
    split_global: bool = True
    # Windowed blocks compute their rel terms inside the kernel from the position tables (one dot and a gather per
    # program) instead of `rel_pos_terms`' GEMM, its copy of q and the terms' round trip through memory. Needs the
    # one-hot bias (bias "" or "onehot") and tables that fit the window (SAM at its own input size).
    window_tables: bool = True
    # Windowed blocks also skip upstream's window partition: qkv and proj run on the image's own tokens (64² per
    # image at 1024 px, not 25 padded windows of 14², 4,900: 16% fewer tokens) and the kernel reads and writes each
    # window in place, taking the padding's k and v from qkv's bias (`samrepro::rel_pos_attention_windows`). Needs
    # window_tables and a qkv bias.
    image_windows: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if not isinstance(size, int) or not (size == 0 or (16 <= size <= 128 and size & (size - 1) == 0)):
                raise ValueError(f"{name} must be 0 (the table) or a power of two in [16, 128], got {size!r}")
        if self.num_warps not in (0, 1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 0 (the table) or a power of two <= 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 0:
            raise ValueError(f"num_stages must be 0 (the table) or positive, got {self.num_stages!r}")
        if self.bias not in ("", "gather", "onehot"):
            raise ValueError(f"bias must be '' (the table), 'gather' or 'onehot', got {self.bias!r}")
        for name in ("split_windows", "split_global", "window_tables", "image_windows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def launch(self) -> tuple[int, int, int, int, str]:
        return self.block_m, self.block_n, self.num_warps, self.num_stages, self.bias


def encoder_attention_forward(
    self: image_encoder.Attention,
    x: torch.Tensor,
    launch: tuple[int, int, int, int, str],
    split_head: bool,
    tables: bool,
) -> torch.Tensor:
    """Upstream `image_encoder.Attention.forward` with softmax, bias and both matmuls in one Triton kernel; with
    `tables`, and tables that fit the (H, W) grid, the rel terms are computed in the kernel too."""
    H, W = x.shape[1:3]  # a window's grid in windowed blocks
    q, k, v = split_heads(self, x)  # B, heads, HW, d: strided views, read in place by the kernel
    *blocks, bias = launch
    if tables and tables_fit(self.rel_pos_h, self.rel_pos_w, (H, W)):
        attention = torch.ops.samrepro.rel_pos_attention_tables
        out = attention(q, k, v, self.rel_pos_h, self.rel_pos_w, self.scale, *blocks, split_head)  # B, heads, HW, d
    else:
        rel_h, rel_w = rel_terms(self, q, (H, W))  # B, heads, H, W, H|W
        rel_h, rel_w = rel_h.flatten(2, 3), rel_w.flatten(2, 3)  # B, heads, HW, H|W
        attention = torch.ops.samrepro.rel_pos_attention
        out = attention(q, k, v, rel_h, rel_w, self.scale, *blocks, split_head, bias)  # B, heads, HW, d
    return merge_heads(self, out, (H, W))  # B, H, W, C; the kernel wrote (B, HW, heads, d): no copy


def windowed_block_forward(
    self: image_encoder.Block, x: torch.Tensor, launch: tuple[int, int, int, int, str], split_head: bool
) -> torch.Tensor:
    """Upstream `image_encoder.Block.forward` of a windowed block without `window_partition`/`window_unpartition`:
    the attention's qkv and proj see the image's tokens (B, H, W, C) and the kernel finds the windows in them."""
    attn = self.attn
    qkv = attn.qkv(self.norm1(x))  # B, H, W, 3C
    heads, scale, (*blocks, _) = attn.num_heads, attn.scale, launch
    attention = torch.ops.samrepro.rel_pos_attention_windows
    out = attention(qkv, attn.qkv.bias, attn.rel_pos_h, attn.rel_pos_w, heads, scale, *blocks, split_head)  # B, H, W, C
    x = x + attn.proj(out)
    return x + self.mlp(self.norm2(x))


def splits_head(head_dim: int) -> bool:
    """Whether a block asking for the split runs its head dim as a power of two plus a tail (not a power of two)."""
    return head_dim & (head_dim - 1) != 0


def _bind(module: nn.Module, forward_fn, *args):
    """`module`'s own forward(x): forward_fn(module, x, *args)."""

    def forward(self, x):
        return forward_fn(self, x, *args)

    return MethodType(forward, module)


def _apply(sam: Sam, config: TritonAttnConfig, undo: Undo) -> None:
    import samrepro.kernels.rel_pos_attention  # noqa: F401  (registers the op; imports Triton, so only when applied)

    layers = [(n, b) for n, b in sam.image_encoder.named_modules() if isinstance(b, image_encoder.Block)]
    plain = [f"{n}.attn" for n, b in layers if not b.attn.use_rel_pos]
    if plain:
        raise PatchError(f"triton_attn fuses the rel-pos bias, but {plain} have use_rel_pos=False")
    launch = config.launch()
    for _, block in layers:
        head_dim = block.attn.qkv.out_features // (3 * block.attn.num_heads)
        wanted = config.split_windows if block.window_size > 0 else config.split_global
        split = wanted and splits_head(head_dim)
        tables = config.window_tables and block.window_size > 0 and config.bias in ("", "onehot")
        undo.setattr(block.attn, "forward", _bind(block.attn, encoder_attention_forward, launch, split, tables))
        fits = tables and tables_fit(block.attn.rel_pos_h, block.attn.rel_pos_w, (block.window_size,) * 2)
        if fits and config.image_windows and block.attn.qkv.bias is not None:
            undo.setattr(block, "forward", _bind(block, windowed_block_forward, launch, split))


PATCH = register_patch(
    Patch(
        name="triton_attn",
        summary="encoder attention in a Triton flash-attention kernel with the rel-pos bias fused (no HW x HW bias)",
        config_cls=TritonAttnConfig,
        apply_fn=_apply,
        # bf16's bounds, since the kernel's error on bf16 inputs is that of bf16 flash attention (fp32 accumulation).
        # On fp32 inputs it runs IEEE fp32 dots; Triton's CPU interpreter gives <= 1.3e-6 max abs error against a
        # float64 reference (tests/test_triton_attn.py). Stacked on sdpa in the bf16 blog plan on the H100
        # (2026-11-21, bs16) agreement moved 0.9887 -> 0.9888 (vit_b) and 0.9920 -> 0.9920 (vit_h). SAF's kernel:
        # mIoU ~0.
        tolerance=Tolerance(
            agreement_miou_min=0.93, gt_miou_drop_max=0.02, embedding_sqnr_min_db=35.0, iou_pred_max_abs=0.05
        ),
        requires=Requires(devices=("cuda",), min_capability=(8, 0), packages=("triton",)),
        slots=(KERNEL_SLOT,),
    )
)
