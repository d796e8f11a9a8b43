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


def compile_attention_kernel(
    kh: int, kw: int, head_dim: int, launch: tuple, split: bool, dtype: str, arch: int, tables: bool,
    windows: bool = False, maxnreg: int | None = None,
):  # fmt: skip
    """samrepro's attention kernel compiled for sm`arch` without a GPU, for the (kh, kw) key grid, `launch`
    (BLOCK_M, BLOCK_N, warps, stages, bias) and `dtype` ("bf16", "fp16", "fp32"); `windows`: reading 14-wide
    windows of a 64² image in place. Pointers and strides are declared 16-byte aligned, as Triton specializes them at
    run time: without that, K and V are not pipelined through shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from samrepro.kernels import rel_pos_attention as rpa

    kernel, names = rpa._rel_pos_attention_fwd, rpa._rel_pos_attention_fwd.arg_names
    bm, bn, warps, stages, bias = launch
    block_d, block_t = rpa.head_blocks(head_dim, split)
    precision = "ieee" if dtype == "fp32" else None
    consts = {"sq_d": 1, "sk_d": 1, "sv_d": 1, "so_d": 1, "KH": kh, "KW": kw, "HEAD_DIM": head_dim, "BLOCK_M": bm}
    consts |= {"BLOCK_N": bn, "BLOCK_D": block_d, "BLOCK_T": block_t, "PRECISION": precision}
    consts |= {"ONEHOT": bias == "onehot", "KHP": rpa.dot_dim(kh), "KWP": rpa.dot_dim(kw), "REL_PRECISION": precision}
    consts |= {"TABLES": tables, "LHP": rpa.dot_dim(2 * kh - 1), "LWP": rpa.dot_dim(2 * kw - 1), "WINDOWS": windows}
    consts |= {"IMG_H": 64 * windows, "IMG_W": 64 * windows, "NWH": 5 if windows else 1, "NWW": 5 if windows else 1}
    scalars = {"qk_scale": "fp32"} | {n: "i32" for n in names[names.index("N_Q") : names.index("so_d") + 1]}
    signature = {n: "constexpr" if n in consts else scalars.get(n, f"*{dtype}") for n in names}
    pointers = names.index("qk_scale")
    aligned = [i for i, n in enumerate(names) if n not in consts and (i < pointers or n.startswith("s"))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in consts.items()}, attrs)
    options = {"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg}
    return triton.compile(src, GPUTarget("cuda", arch, 32), options)
