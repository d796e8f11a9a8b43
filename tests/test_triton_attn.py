"""triton_attn: the fused rel-pos flash-attention kernel under Triton's CPU interpreter, and the patch's contract.

The kernel checks run in one child process (`python tests/test_triton_attn.py OUT.json`) started with
TRITON_INTERPRET=1: the interpreter is chosen when a kernel is decorated, and this pytest process may already hold
the compiled (GPU) kernel, or need it. The child writes its measurements; the tests below judge them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import window_partition, window_unpartition

import samrepro
from samrepro.patch import PatchError, PatchUnavailable, Undo
from samrepro.patches import triton_attn  # registers the patch
from samrepro.patches._relpos import rel_pos_terms
from samrepro.patches.triton_attn import TritonAttnConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def published_rel_bias(
        rh_row, rw_row, q_mask, start_n, offs_n, KH: tl.constexpr, KW: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """SAF's index (its step-6 kernel): the key block taken for one grid row, row = start_n // BLOCK_N."""
        key = start_n + offs_n
        rh = tl.load(rh_row + start_n // BLOCK_N, mask=q_mask, other=0.0)[:, None]
        rw = tl.load(rw_row[:, None] + (key % KW)[None, :], mask=q_mask[:, None] & (key < KH * KW)[None, :], other=0.0)
        return rh.to(tl.float32) + rw.to(tl.float32)


# name: (batch, heads, kh, kw, head_dim, BLOCK_M, BLOCK_N, dtype); 0 blocks take the kernel's table
CASES = {
    "bn<w_in_one_row": (1, 2, 2, 32, 16, 16, 16, "float32"),
    "bn<w_spans_rows": (2, 1, 3, 40, 32, 16, 16, "float32"),  # blocks start mid-row and cross row ends
    "bn==w": (1, 2, 4, 16, 32, 32, 16, "float32"),
    "bn>w_multiple": (2, 1, 8, 8, 16, 16, 32, "float32"),
    "bn>w_window6x6_bs1": (1, 1, 6, 6, 32, 16, 16, "float32"),  # SAF's bug: 16 keys = 2.7 rows
    "bn>w_window7x7_d20": (1, 2, 7, 7, 20, 32, 32, "float32"),  # head dim 20 -> BLOCK_D 32 (as 80 -> 128)
    "window14x14_d40": (2, 1, 14, 14, 40, 64, 64, "float32"),  # SAM's window, 196 keys
    "global16x16_table": (1, 2, 16, 16, 64, 0, 0, "float32"),  # the tiny model's global blocks
    "rows64_table_fp16": (1, 2, 5, 64, 64, 0, 0, "float16"),  # 128x64 blocks: one key block per 64-wide row
    "window14x14_table_bf16": (2, 1, 14, 14, 32, 0, 0, "bfloat16"),
    "fp16_window7x7": (2, 1, 7, 7, 32, 16, 16, "float16"),
    "fp16_window6x6_d80": (1, 1, 6, 6, 80, 32, 16, "float16"),  # vit_h head dim: BLOCK_D 128, masked
    "window14x14_d80_table_bf16": (1, 2, 14, 14, 80, 0, 0, "bfloat16"),  # vit_h's windows, the table's blocks
    "bn>w_window5x5_d8": (1, 1, 5, 5, 8, 16, 32, "float32"),  # head dim below the smallest dot: BLOCK_D 16
    "bf16_window7x7": (2, 1, 7, 7, 32, 16, 16, "bfloat16"),
    "window5x5_d100": (1, 1, 5, 5, 100, 16, 16, "float32"),  # padded to 128; split: 64 + a 64-wide tail, 28 masked
}
# Cases run once more with the head dim split (a power of two plus a tail) instead of padded; d40 splits 32 + 16
SPLIT = ("bn>w_window7x7_d20", "window14x14_d40", "fp16_window6x6_d80", "window14x14_d80_table_bf16", "window5x5_d100")
# Max abs error against a float64 reference on the same (rounded) inputs; outputs are O(1). Measured in the
# interpreter (seeds 0-2): fp32 <= 1.3e-6; fp16 <= 1.1e-3; bf16 <= 2.2e-2, where CPU SDPA in bf16 gives 1.2e-2
# (the kernel also rounds the pre-scaled q and the probabilities p to the input dtype).
TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 4e-2}
PUBLISHED_INDEX = ("bn<w_spans_rows", "bn>w_window6x6_bs1", "bn==w")  # right only when BLOCK_N == kw


def inputs(batch, heads, kh, kw, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, dt = kh * kw, getattr(torch, dtype)
    q, k, v = (torch.randn(batch, heads, n, d, generator=gen).to(dt) for _ in range(3))
    rel_h = torch.randn(batch, heads, n, kh, generator=gen).to(dt)
    rel_w = torch.randn(batch, heads, n, kw, generator=gen).to(dt)
    return q, k, v, rel_h, rel_w, d**-0.5


def case_error(rpa, batch, heads, kh, kw, d, bm, bn, dtype, split=False, bias="") -> float:
    args = inputs(batch, heads, kh, kw, d, dtype)
    out = torch.ops.samrepro.rel_pos_attention(*args, bm, bn, 0, 0, split, bias)
    ref = rpa.reference(*(t.double() for t in args[:5]), args[5])
    return (out.double() - ref).abs().max().item()


def tables_error(rpa, batch, heads, kh, kw, d, bm, bn, dtype, split=False, device="cpu") -> float:
    """`rel_pos_attention_tables` against the float64 reference with the terms `rel_pos_terms` builds from the same
    (rounded) position tables, rounded to q's dtype as the kernel rounds them (and as the terms' GEMM does)."""
    *qkv, _, _, scale = inputs(batch, heads, kh, kw, d, dtype)
    gen = torch.Generator().manual_seed(7)
    tables = ((torch.randn(2 * n - 1, d, generator=gen) * d**-0.5).to(qkv[0].dtype) for n in (kh, kw))  # terms ~1
    q, k, v, table_h, table_w = (t.to(device) for t in (*qkv, *tables))
    out = torch.ops.samrepro.rel_pos_attention_tables(q, k, v, table_h, table_w, scale, bm, bn, 0, 0, split)
    terms = rel_pos_terms(q.double(), table_h.double(), table_w.double(), (kh, kw), (kh, kw))
    terms = [t.flatten(2, 3).to(q.dtype).double() for t in terms]  # B, heads, N_q, kh | kw
    ref = rpa.reference(q.double(), k.double(), v.double(), *terms, scale)
    return (out.double() - ref.to(device)).abs().max().item()


# name: (images, height, width, heads, head_dim, window, dtype): images of tokens cut into windows in place
WINDOW_CASES = {
    "tiny_16x16_w6": (2, 16, 16, 2, 16, 6, "float32"),  # padded to 18x18 at the bottom and right
    "odd_13x10_w7_d20": (1, 13, 10, 1, 20, 7, "float32"),  # unequal sides, head dim 20 (-> 32, or 16 + 16 split)
    "unpadded_12x12_w6": (1, 12, 12, 2, 32, 6, "float32"),
    "rows_padded_16x12_w6": (1, 16, 12, 1, 16, 6, "float32"),  # only the last window row hangs over the image
    "vit_h_like_16x20_w6_d80_bf16": (1, 16, 20, 1, 80, 6, "bfloat16"),
}


def windows_error(rpa, images, height, width, heads, d, window, dtype, split=False, device="cpu") -> float:
    """`rel_pos_attention_windows` on a (images, height, width) qkv against the path it replaces: padded with the
    qkv bias (upstream's zero tokens after norm1), `window_partition`, the float64 reference per window with the
    tables' terms, `window_unpartition`."""
    gen = torch.Generator().manual_seed(5)
    dt, channels = getattr(torch, dtype), heads * d
    qkv = torch.randn(images, height, width, 3 * channels, generator=gen).to(dt)
    bias = torch.randn(3 * channels, generator=gen).to(dt)
    table_h, table_w = ((torch.randn(2 * window - 1, d, generator=gen) * d**-0.5).to(dt) for _ in range(2))
    qkv, bias, table_h, table_w = (t.to(device) for t in (qkv, bias, table_h, table_w))
    out = torch.ops.samrepro.rel_pos_attention_windows(qkv, bias, table_h, table_w, heads, d**-0.5, 0, 0, 0, 0, split)
    padded_hw = (-(-height // window) * window, -(-width // window) * window)
    padded = bias.double().expand(images, *padded_hw, -1).clone()
    padded[:, :height, :width] = qkv.double()
    windows, _ = window_partition(padded, window)  # images * windows, window, window, 3C
    q, k, v = windows.flatten(1, 2).unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4).unbind(0)  # n, heads, w², d
    terms = rel_pos_terms(q, table_h.double(), table_w.double(), (window, window), (window, window))
    terms = [t.flatten(2, 3).to(dt).double() for t in terms]  # rounded to q's dtype, as the kernel rounds them
    ref = rpa.reference(q, k, v, *terms, d**-0.5).transpose(1, 2).reshape(-1, window, window, channels)
    ref = window_unpartition(ref, window, padded_hw, (height, width))  # images, height, width, C
    return (out.double() - ref).abs().max().item()


def widen_bf16_dots() -> None:
    """Triton 3.6's interpreter multiplies bf16 dot operands as raw uint16 bits; widen them to fp32 (exact)."""
    from triton.runtime.interpreter import InterpreterBuilder

    dot = InterpreterBuilder.create_dot

    def create_dot(self, a, b, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return dot(self, a, b, *args)

    InterpreterBuilder.create_dot = create_dot


def interpreter_checks() -> dict:
    """Run in the child under TRITON_INTERPRET=1: every measurement the tests judge."""
    from samrepro.kernels import COUNTERS
    from samrepro.kernels import rel_pos_attention as rpa
    from samrepro.models import build_tiny, randomize

    assert rpa.INTERPRETED, "the child must run with TRITON_INTERPRET=1"
    widen_bf16_dots()
    res = {"cases": {name: case_error(rpa, *case) for name, case in CASES.items()}}
    res["split"] = {name: case_error(rpa, *CASES[name], split=True) for name in SPLIT}
    for bias in rpa.BIAS_MODES:
        res[bias] = {name: case_error(rpa, *case, bias=bias) for name, case in CASES.items()}
    res["onehot_split"] = {name: case_error(rpa, *CASES[name], split=True, bias="onehot") for name in SPLIT}
    res["tables"] = {name: tables_error(rpa, *case) for name, case in CASES.items()}
    res["tables_split"] = {name: tables_error(rpa, *CASES[name], split=True) for name in SPLIT}
    res["windows"] = {name: windows_error(rpa, *case) for name, case in WINDOW_CASES.items()}
    res["windows_split"] = {name: windows_error(rpa, *case, split=True) for name, case in WINDOW_CASES.items()}
    fixed, rpa._rel_bias = rpa._rel_bias, published_rel_bias  # the interpreter looks helpers up at run time
    res["published"] = {name: case_error(rpa, *CASES[name], bias="gather") for name in PUBLISHED_INDEX}
    rpa._rel_bias = fixed

    args = inputs(2, 2, 7, 7, 16, "float32")
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # AOT: the compiled block below
    opcheck = torch.library.opcheck(torch.ops.samrepro.rel_pos_attention.default, (*args, 16, 16), test_utils=checks)
    res["opcheck"] = {k: v for k, v in opcheck.items() if v != "SUCCESS"}
    qkv, bias, table = torch.randn(2, 5, 6, 3 * 2 * 16), torch.randn(3 * 2 * 16), torch.randn(5, 16)  # 3x3 windows
    windows = torch.ops.samrepro.rel_pos_attention_windows.default
    opcheck = torch.library.opcheck(windows, (qkv, bias, table, table, 2, 0.25), test_utils=checks)
    res["opcheck"] |= {f"windows {k}": v for k, v in opcheck.items() if v != "SUCCESS"}

    sam = randomize(build_tiny()).eval()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = sam.image_encoder(x)
        undo = Undo()
        triton_attn.PATCH.apply_fn(sam, TritonAttnConfig(), undo)  # the CUDA requirement is bypassed here
        COUNTERS.clear()
        out = sam.image_encoder(x)
        rel_err = ((out - ref).abs().max() / ref.abs().max()).item()
        res["encoder"] = {"count": COUNTERS.get(rpa.PATH, 0), "rel_err": rel_err}

        block = sam.image_encoder.blocks[1]  # 6x6 windows over 16x16 tokens padded to 18x18
        tokens = torch.randn(2, 16, 16, 128, generator=torch.Generator().manual_seed(2))  # B, H, W, C
        eager = block(tokens)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        COUNTERS.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):  # a traced Python counter would recompile
            outs = [compiled(tokens) for _ in range(3)]
        res["compiled"] = {"equal": all(torch.equal(o, eager) for o in outs), "count": COUNTERS.get(rpa.PATH, 0)}
        undo.run()
        res["encoder"]["undone_equal"] = torch.equal(sam.image_encoder(x), ref)
        res["split_options"] = {
            "default": split_check(rpa, 40, TritonAttnConfig()),
            "windows_only": split_check(rpa, 40, TritonAttnConfig(split_global=False)),
            "global_only": split_check(rpa, 40, TritonAttnConfig(split_windows=False)),
            "d16": split_check(rpa, 32, TritonAttnConfig()),
        }
    return res


def split_check(rpa, embed_dim: int, config: TritonAttnConfig) -> dict:
    """An encoder with head dim embed_dim / 2, one windowed and one global block, patched with `config`: which calls
    split (recorded at the kernel's head-dim choice) and the error against upstream."""
    enc = ImageEncoderViT(
        img_size=64, patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
        use_rel_pos=True, out_chans=16,
    ).eval()  # fmt: skip
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref = enc(x)
    undo, calls, head_blocks = Undo(), [], rpa.head_blocks
    rpa.head_blocks = lambda d, split: calls.append(split) or head_blocks(d, split)
    triton_attn.PATCH.apply_fn(SimpleNamespace(image_encoder=enc), config, undo)
    out = enc(x)
    rpa.head_blocks = head_blocks
    undo.run()
    return {"splits": calls, "rel_err": ((out - ref).abs().max() / ref.abs().max()).item()}


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict:
    from tests.conftest import interpreted_child  # not at the top: this file also runs as the child's script

    return interpreted_child(__file__, tmp_path_factory)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_materialized_bias_reference(interp, case):
    err = interp["cases"][case]
    assert err <= TOL[CASES[case][-1]], f"{case}: max abs error {err:.3g}"


@pytest.mark.parametrize("case", SPLIT)
def test_split_head_dim_matches_reference(interp, case):
    err = interp["split"][case]
    assert err <= TOL[CASES[case][-1]], f"{case} split: max abs error {err:.3g}"


BIAS_CASES = [(b, c) for b in ("gather", "onehot") for c in CASES] + [("onehot_split", c) for c in SPLIT]


@pytest.mark.parametrize("bias, case", BIAS_CASES)
def test_each_bias_mode_matches_reference(interp, bias, case):
    """Per-key loads and the one-hot tensor-core dots, whatever the table picks, padded and split head dims."""
    err = interp[bias][case]
    assert err <= TOL[CASES[case][-1]], f"{case} {bias}: max abs error {err:.3g}"


@pytest.mark.parametrize("mode, case", [("tables", c) for c in CASES] + [("tables_split", c) for c in SPLIT])
def test_rel_terms_from_the_tables_match_reference(interp, mode, case):
    """The kernel computing the rel terms itself (one dot of q against each table, then each query's offsets)."""
    err = interp[mode][case]
    assert err <= TOL[CASES[case][-1]], f"{case} {mode}: max abs error {err:.3g}"


@pytest.mark.parametrize("mode", ["windows", "windows_split"])
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_windows_read_in_place_match_the_partitioned_path(interp, mode, case):
    """Windows found in the unpadded image, the padding's k and v from the bias: what partition, pad and unpartition
    around the tables kernel give."""
    err = interp[mode][case]
    assert err <= TOL[WINDOW_CASES[case][-1]], f"{case} {mode}: max abs error {err:.3g}"


def test_split_options_choose_the_blocks_that_split(interp):
    checks = interp["split_options"]  # splits: [block 0 (windowed), block 1 (global)]
    assert checks["default"]["splits"] == [True, True]
    assert checks["windows_only"]["splits"] == [True, False]
    assert checks["global_only"]["splits"] == [False, True]
    assert checks["d16"]["splits"] == [False, False]  # a power-of-two head dim has nothing to split
    assert all(c["rel_err"] <= 1e-5 for c in checks.values())


@pytest.mark.parametrize("case", PUBLISHED_INDEX)
def test_published_row_index_fails_unless_block_is_one_row(interp, case):
    err = interp["published"][case]
    if case == "bn==w":  # key block == grid row: SAF's index is right there, so the test is about the index alone
        assert err <= TOL["float32"]
    else:
        assert err > 100 * TOL["float32"], f"{case}: the wrong index went unnoticed (error {err:.3g})"


def test_patched_block_compiles_fullgraph_and_counts_every_call(interp):
    assert interp["compiled"] == {"equal": True, "count": 3}  # one graph, the op's own Python counts each call


def test_opcheck(interp):
    assert interp["opcheck"] == {}


def test_patched_tiny_encoder_matches_upstream_and_undoes(interp):
    enc = interp["encoder"]
    assert enc["count"] == 6, "one kernel call per encoder block (4 windowed 6x6, 2 global 16x16), no other path"
    assert enc["rel_err"] <= 1e-5
    assert enc["undone_equal"]


# --- in this process: no kernel runs -------------------------------------------------------------


# SAM's own shapes on the GPU: (batch, heads, kh, kw, head_dim, BLOCK_M, BLOCK_N, dtype), 0 blocks: the table
GPU_CASES = {
    "vit_b_global_bs1_bf16": (1, 12, 64, 64, 64, 0, 0, "bfloat16"),
    "vit_b_window_bs2_bf16": (2 * 25, 12, 14, 14, 64, 0, 0, "bfloat16"),
    "vit_h_global_bs1_bf16": (1, 16, 64, 64, 80, 0, 0, "bfloat16"),
    "vit_h_window_bs1_fp16": (25, 16, 14, 14, 80, 0, 0, "float16"),
    "vit_b_global_bs1_fp32": (1, 2, 64, 64, 64, 0, 0, "float32"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", [*CASES, *GPU_CASES])
def test_compiled_kernel_matches_reference_on_gpu(device, case):
    """The real (compiled) kernel on the GPU: the interpreter cases plus SAM's global/window shapes at batch 1."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda")
    from samrepro.kernels import COUNTERS
    from samrepro.kernels import rel_pos_attention as rpa

    batch, heads, kh, kw, d, bm, bn, dtype = {**CASES, **GPU_CASES}[case]
    *tensors, scale = inputs(batch, heads, kh, kw, d, dtype)
    q, k, v, rel_h, rel_w = (t.to(device) for t in tensors)
    COUNTERS.clear()
    out = torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, scale, bm, bn)
    ref = rpa.reference(*(t.double() for t in (q, k, v, rel_h, rel_w)), scale)
    err = (out.double() - ref).abs().max().item()
    assert COUNTERS.get(rpa.PATH, 0) == 1, "the kernel ran, no fallback"
    assert err <= TOL[dtype], f"{case}: max abs error {err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["vit_h_global_bs1_bf16", "vit_h_window_bs1_fp16"])
@pytest.mark.parametrize("bias", ["gather", "onehot"])
def test_split_kernel_matches_reference_on_gpu(device, case, bias):
    """vit_h's head dim 80 as 64 + 16, the table's launch, each bias mode."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda")
    from samrepro.kernels import rel_pos_attention as rpa

    batch, heads, kh, kw, d, _, _, dtype = GPU_CASES[case]
    *tensors, scale = inputs(batch, heads, kh, kw, d, dtype)
    q, k, v, rel_h, rel_w = (t.to(device) for t in tensors)
    out = torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, scale, 0, 0, 0, 0, True, bias)
    ref = rpa.reference(*(t.double() for t in (q, k, v, rel_h, rel_w)), scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype], f"{case} split {bias}: max abs error {err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["vit_b_window_bs2_bf16", "vit_h_window_bs1_fp16"])
@pytest.mark.parametrize("split", [False, True])
def test_tables_kernel_matches_reference_on_gpu(device, case, split):
    """The rel terms computed in the kernel from the position tables, at SAM's window shapes."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda")
    from samrepro.kernels import rel_pos_attention as rpa

    err = tables_error(rpa, *GPU_CASES[case], split=split, device=device)
    assert err <= TOL[GPU_CASES[case][-1]], f"{case} split={split}: max abs error {err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("model", ["vit_b", "vit_h"])
def test_windows_kernel_matches_the_partitioned_path_on_gpu(device, model):
    """SAM's windowed blocks at 1024 px: a 64² image in 25 windows of 14², the last row and column padded."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda")
    from samrepro.kernels import rel_pos_attention as rpa

    heads, d = {"vit_b": (12, 64), "vit_h": (16, 80)}[model]
    err = windows_error(rpa, 2, 64, 64, heads, d, 14, "bfloat16", split=model == "vit_h", device=device)
    assert err <= TOL["bfloat16"], f"{model}: max abs error {err:.3g}"


def test_patch_is_skipped_on_cpu_with_its_reason():
    patch = samrepro.get_patch("triton_attn")
    assert patch.unavailable_reason("cpu") == "needs device cuda, got cpu"
    sam = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]))
    with pytest.raises(PatchUnavailable, match="triton_attn: needs device cuda"):
        patch.apply(sam)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fake_impl_and_input_errors():
    from samrepro.kernels import rel_pos_attention as rpa

    *tensors, scale = inputs(2, 3, 4, 6, 8, "float32")
    q, k, v, rel_h, rel_w = (t.to("meta") for t in tensors)
    out = torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, scale)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()  # (B, N, heads, d) memory, for proj
    with pytest.raises(ValueError, match="k, v must be"):
        torch.ops.samrepro.rel_pos_attention(q, k[:, :, :-1], v, rel_h, rel_w, scale)
    with pytest.raises(ValueError, match="rel_h, rel_w must start"):
        torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h[:, :1], rel_w, scale)
    with pytest.raises(ValueError, match="must share one of"):
        torch.ops.samrepro.rel_pos_attention(q, k.half(), v, rel_h, rel_w, scale)
    with pytest.raises(ValueError, match="bias must be one of"):
        torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, scale, bias="dots")
    with pytest.raises(ValueError, match=r"powers of two in \[16, 128\]"):
        torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, scale, 64, 256)
    if not rpa.INTERPRETED:  # CPU tensors never fall back to anything
        cpu = inputs(1, 1, 2, 2, 8, "float32")
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            torch.ops.samrepro.rel_pos_attention(*cpu)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tables_path_hands_the_kernel_row_major_qkv(monkeypatch):
    """sparse24's Linear leaves q/k/v column-major (token stride 1); the tables kernel faults on such inputs on
    H100/H200, so the op copies them to row-major before launching. Checked at the launch, without a GPU."""
    from samrepro.kernels import rel_pos_attention as rpa

    seen = []

    def launch(q, k, v, *args, **kwargs):
        seen.append((q.stride(), k.stride(), v.stride()))
        return q + k + v

    monkeypatch.setattr(rpa, "_run", launch)
    b, heads, n, d = 2, 3, 16, 8  # a 4x4 key grid
    q, k, v = torch.randn(3, b, heads, d, n).transpose(-1, -2).unbind(0)  # each (B, heads, N, d), token stride 1
    table = torch.randn(7, d)
    out = torch.ops.samrepro.rel_pos_attention_tables(q, k, v, table, table, d**-0.5)
    assert q.stride(-2) == 1
    assert seen == [((heads * n * d, n * d, d, 1),) * 3]
    torch.testing.assert_close(out, q + k + v, rtol=0, atol=0)


def test_windows_path_hands_the_kernel_row_major_qkv(monkeypatch):
    """The same guard for the windows op, which takes qkv whole: a column-major qkv (sparse24's) reaches the kernel
    row-major, and a row-major one is not copied."""
    from samrepro.kernels import rel_pos_attention as rpa

    seen = []

    def launch(q, k, v, *args, **kwargs):
        seen.append(q.stride())
        return rpa._empty_out(q)

    monkeypatch.setattr(rpa, "_run", launch)
    b, h, w, heads, d = 2, 5, 6, 2, 8
    row_major = torch.randn(b, h, w, 3 * heads * d)
    column_major = torch.randn(3 * heads * d, b * h * w).t().view(b, h, w, -1)  # token stride 1
    table = torch.randn(5, d)  # 3x3 windows
    for qkv in (column_major, row_major):
        torch.ops.samrepro.rel_pos_attention_windows(qkv, torch.randn(3 * heads * d), table, table, heads, 0.5)
    assert seen == [(h * w * 3 * heads * d, d, 3 * heads * d, 1)] * 2  # B, heads, HW, d views of a row-major qkv


@pytest.mark.parametrize("op", ["rel_pos_attention", "rel_pos_attention_tables", "rel_pos_attention_windows"])
def test_launch_gets_no_copy_of_the_inputs(monkeypatch, op):
    """Every op hands the kernel its inputs as they are (strided views of one qkv output, as in the encoder): no
    argument of the launch is a new tensor as large as q. Checked at the launch, without a GPU."""
    from samrepro.kernels import rel_pos_attention as rpa

    launches, names = [], rpa._rel_pos_attention_fwd.arg_names

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)

    monkeypatch.setattr(rpa, "_rel_pos_attention_fwd", Kernel())
    monkeypatch.setattr(rpa, "INTERPRETED", True)
    b, h, w, heads, d = 2, 4, 4, 2, 16  # a 4x4 grid: one window of the image, or the global grid
    qkv = torch.randn(b, h, w, 3 * heads * d)
    q, k, v = qkv.view(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # B, heads, HW, d: strided views
    table = torch.randn(2 * h - 1, d)
    if op == "rel_pos_attention_windows":
        torch.ops.samrepro.rel_pos_attention_windows(qkv, torch.randn(3 * heads * d), table, table, heads, 0.25)
    elif op == "rel_pos_attention_tables":
        torch.ops.samrepro.rel_pos_attention_tables(q, k, v, table, table, 0.25)
    else:
        rel_h, rel_w = torch.randn(b, heads, h * w, h), torch.randn(b, heads, h * w, w)
        torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, 0.25)
    (args,) = launches
    out = args[names.index("o_ptr")]  # allocated for the kernel to write
    big = [a for a in args if isinstance(a, torch.Tensor) and a.numel() >= q.numel() and a is not out]
    assert big and all(a.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for a in big)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "dtype, kh, kw, d, arch, split, bias, tables",
    [
        ("bf16", 64, 64, 64, 90, False, "gather", False),
        ("fp16", 14, 14, 80, 80, False, "gather", False),
        ("bf16", 64, 64, 80, 90, False, "gather", False),
        ("bf16", 14, 14, 80, 90, True, "gather", False),
        ("fp16", 14, 14, 80, 80, False, "onehot", False),
        ("bf16", 14, 14, 64, 90, False, "onehot", False),
        ("bf16", 14, 14, 80, 90, True, "onehot", False),
        ("bf16", 14, 14, 64, 90, False, "onehot", True),
        ("bf16", 14, 14, 80, 90, True, "onehot", True),
        ("bf16", 14, 14, 64, 90, False, "onehot", "windows"),
        ("bf16", 14, 14, 80, 90, True, "onehot", "windows"),
        ("fp16", 14, 14, 80, 80, True, "onehot", "windows"),
    ],
    ids=["vit_b_global_sm90", "vit_h_window_sm80", "vit_h_global_sm90", "vit_h_window_split_sm90", "onehot_h_win_sm80",
         "onehot_b_win_sm90", "onehot_h_win_split_sm90", "tables_b_win_sm90", "tables_h_win_split_sm90",
         "image_windows_b_sm90", "image_windows_h_split_sm90", "image_windows_h_split_sm80"],
)  # fmt: skip
def test_kernel_compiles_for_gpus_with_the_table_blocks(dtype, kh, kw, d, arch, split, bias, tables):
    """Triton compiles to a cubin without a GPU: catches what the interpreter lets through (types, constexprs).
    `tables` "windows": the tables path reading 25 windows of 14² from a 64² image in place."""
    from samrepro.kernels import rel_pos_attention as rpa
    from tests.attention_blocks import compile_attention_kernel

    bm, bn, warps, stages, _ = rpa.default_launch(kh * kw, d, 4 if dtype == "fp32" else 2, split)
    launch = (bm, bn, warps, stages, bias)
    compiled = compile_attention_kernel(kh, kw, d, launch, split, dtype, arch, bool(tables), tables == "windows")
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 160 * 1024  # fits an A100 (and an H100)


def test_image_windows_keep_the_tables_kernels_shared_memory_tiles():
    """Reading windows from the image adds index math and bias rows, not tiles: compiled for sm90, the window mode
    allocates as many shared-memory buffers, and as many bytes, as the tables path over contiguous windows (padding
    keys substituted into the K and V tiles cost a buffer each and 1.75x the time on the H100)."""
    from samrepro.kernels import rel_pos_attention as rpa
    from tests.attention_blocks import compile_attention_kernel

    launch = rpa.default_launch(196, 80, 2, True)  # vit_h's windows, head dim split 64 + 16

    def compiled(windows: bool):
        out = compile_attention_kernel(14, 14, 80, launch, True, "bf16", 90, True, windows)
        return out.asm["ttgir"].count("ttg.local_alloc"), out.metadata.shared

    assert compiled(True) == compiled(False)


@pytest.mark.slow
@pytest.mark.parametrize("d, split", [(64, False), (80, True)], ids=["vit_b", "vit_h"])
def test_image_windows_keep_the_dots_pipelined_and_fit_the_register_cap(d, split):
    """ptxas on the window mode's sm90 code (Triton's own ptxas, no GPU): no warning that the wgmmas run serialized
    (a write to their accumulator inside the loop did that, 1.63x the partitioned launch's time on the H100), and
    under the launch's register cap no spills."""
    import triton

    from samrepro.kernels import rel_pos_attention as rpa
    from tests.attention_blocks import compile_attention_kernel

    launch = rpa.default_launch(196, d, 2, split)
    ptx = compile_attention_kernel(14, 14, d, launch, split, "bf16", 90, True, True, rpa.WINDOWS_MAXNREG).asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        cmd = [str(ptxas), "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    assert "wgmma" in ptx and "C7515" not in report, report  # C7515: wgmma.mma_async instructions are serialized
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    used = int(re.search(r"Used (\d+) registers", report).group(1))
    assert used <= rpa.WINDOWS_MAXNREG, report


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_refuses_encoders_without_rel_pos():
    enc = ImageEncoderViT(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1, use_rel_pos=False)
    with pytest.raises(PatchError, match="use_rel_pos=False"):
        triton_attn.PATCH.apply_fn(SimpleNamespace(image_encoder=enc), TritonAttnConfig(), Undo())


def test_config_validates_and_round_trips():
    cfg = TritonAttnConfig(block_m=64, block_n=32, num_warps=4, num_stages=3, bias="onehot", split_global=False)
    assert TritonAttnConfig.from_dict(cfg.to_dict()) == cfg and cfg.launch() == (64, 32, 4, 3, "onehot")
    bads = ({"block_n": 24}, {"block_m": 8}, {"block_n": 256}, {"num_warps": 3}, {"num_stages": -1}, {"bias": "dot"})
    for bad in (*bads, {"split_windows": 1}, {"split_global": "yes"}, {"image_windows": 0}):
        with pytest.raises(ValueError):
            TritonAttnConfig(**bad)


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(interpreter_checks()))
