"""Flash-attention forward with SAM's decomposed relative-position bias fused in (SAF step 6).

out = softmax_keys(scale * q·k + rel_h[q, key // kw] + rel_w[q, key % kw]) @ v, keys on a kh x kw grid. The
(N_q, N_k) bias is never materialised: every key block gathers its two terms from rel_h (N_q, kh) and rel_w
(N_q, kw) by each key's own grid row and column, so any BLOCK_N is right (SAF's kernel took the key block for
one grid row: wrong unless BLOCK_N == 64). The softmax runs in base 2: q is pre-scaled by scale * log2(e) and
the bias is multiplied by log2(e) too (SAF's kernel left the bias unscaled until 387488b).

`samrepro::rel_pos_attention_tables` takes the (2k - 1, d) position tables instead of the terms, for queries on the
key grid, and computes each program's terms from its own q (one dot per table and a gather).
`samrepro::rel_pos_attention_windows` runs the tables kernel on every window of an unpadded image of tokens, read
from and written to the image in place (SAM's windowed blocks without their window partition).

Each call's launch fits the GPU it runs on: `default_launch` was measured on an H100 (227 KiB of shared memory per
block); where its launch would not fit (99 KiB on sm86 and sm89), `fit_launch` steps it down by `shared_bytes`.

Registered as custom ops with fake implementations, so torch.compile traces each as one opaque call. Not
`torch.library.triton_op`: its `wrap_triton` refuses the kernels of Triton's CPU interpreter (TRITON_INTERPRET=1),
which is how this kernel is tested without a GPU. Forward only, no autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from samrepro.kernels import COUNTERS

PATH = "rel_pos_attention.triton"  # the COUNTERS key; there is no fallback path: unfit inputs raise
LOG2E = tl.constexpr(math.log2(math.e))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 accumulation; fp32 dots run in IEEE, not TF32
MAX_HEAD_DIM = 256
MAX_BLOCK = 128  # a 256-key block with a split head dim faulted on the H100 (2026-11-21); the table never uses 256
# Registers per thread in window mode, as the partitioned windows' launch uses (sm90, 64x32, 4 warps: vit_h 125,
# vit_b 116): four programs per SM. Uncapped, the window terms took vit_h's launch to 164 (three per SM); capped,
# ptxas spills nothing (benchmarks/attention_kernel_ab.py times both). None: no cap.
WINDOWS_MAXNREG: int | None = 128


def default_launch(n_k: int, head_dim: int, itemsize: int, split: bool = False) -> tuple[int, int, int, int, str]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, bias) from the H100 sweeps of benchmarks/attn_bench.py, bf16, batch
    16 (reports/2026-11-21-h100-onehot-kernel-and-peer): windows 64x32, 3 stages, one-hot bias (vit_b 0.47 ms
    against 0.84 with per-key loads, vit_h split 0.73 against 1.42); global head dim 64 64x64, 4 stages (2.78 ms;
    the old kernel, re-reading rel_w every step: 3.90); global split head dim 64x64 (vit_h 4.78 ms; padded 128x64
    5.57, the old kernel 10.8)."""
    if itemsize == 4:  # fp32 tiles are twice as big: keep K/V stages for head dim 128 under ~100 KB of shared memory
        return 64, 32, 4, 2, "gather"
    if n_k <= 256:  # SAM's 14x14 windows (196 keys): key blocks cross grid rows, so the bias is two one-hot dots
        return 64, 32, 4, 3, "onehot"
    if head_dim <= 64:  # 64x64 global attention: one grid row per key block, rel_w loaded once
        return 64, 64, 4, 4, "gather"
    if split:
        return 64, 64, 4, 3, "gather"
    return 128, 64, 8, 3, "gather"


BIAS_MODES = ("gather", "onehot")


@triton.jit
def _rel_bias(rh_row, rw_row, q_mask, start_n, offs_n, KH: tl.constexpr, KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) bias rel_h[q, key // KW] + rel_w[q, key % KW] of the keys start_n + offs_n."""
    if KW % BLOCK_N == 0:  # the block lies in one grid row: one rel_h value per query, a contiguous rel_w slice
        rh = tl.load(rh_row + start_n // KW, mask=q_mask, other=0.0)[:, None]
        rw = tl.load(rw_row[:, None] + (start_n % KW + offs_n)[None, :], mask=q_mask[:, None], other=0.0)
    else:  # the block spans several rows, or part of one: every key looks up its own row
        key = start_n + offs_n
        mask = q_mask[:, None] & (key < KH * KW)[None, :]
        rh = tl.load(rh_row[:, None] + (key // KW)[None, :], mask=mask, other=0.0)
        rw = tl.load(rw_row[:, None] + (key % KW)[None, :], mask=mask, other=0.0)
    return rh.to(tl.float32) + rw.to(tl.float32)


@triton.jit
def _onehot_bias(
    rh_t, rw_t, start_n, offs_n, KW: tl.constexpr, KHP: tl.constexpr, KWP: tl.constexpr, PRECISION: tl.constexpr
):
    """The same bias on the tensor cores: rel_h (BLOCK_M, KHP) @ onehot(key row) + rel_w @ onehot(key column),
    from rel tiles loaded once per program (columns past KH | KW are zero). Exact: one nonzero product per sum."""
    key = start_n + offs_n
    row = tl.where(tl.arange(0, KHP)[:, None] == (key // KW)[None, :], 1.0, 0.0).to(rh_t.dtype)  # KHP, BLOCK_N
    col = tl.where(tl.arange(0, KWP)[:, None] == (key % KW)[None, :], 1.0, 0.0).to(rw_t.dtype)  # KWP, BLOCK_N
    bias_h = tl.dot(rh_t, row, input_precision=PRECISION, out_dtype=tl.float32)
    return tl.dot(rw_t, col, bias_h, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _table_terms(
    q, q_base, sq_d, q_mask, t_ptr, pos,
    K: tl.constexpr, KP: tl.constexpr, LP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, KP) rel terms q · table[pos - j + K - 1] for key rows (or columns) j < K, zero for j >= K, from the
    unscaled q (BLOCK_M, BLOCK_D) at grid row (or column) `pos`: one dot of q against the (2K - 1, HEAD_DIM)
    table, then each query gathers its K offsets."""
    rows = tl.arange(0, LP)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (rows < 2 * K - 1)[None, :]
    tab = tl.load(t_ptr + rows[None, :] * HEAD_DIM + offs_d[:, None], mask=row_ok & (offs_d < HEAD_DIM)[:, None])
    per_offset = tl.dot(q, tab.to(q.dtype), input_precision=PRECISION)  # BLOCK_M, LP
    if HEAD_DIM > BLOCK_D:  # the split head dim's tail columns
        offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
        q_t = tl.load(q_base + offs_t[None, :] * sq_d, mask=q_mask[:, None] & (offs_t < HEAD_DIM)[None, :], other=0.0)
        tab_t = tl.load(t_ptr + rows[None, :] * HEAD_DIM + offs_t[:, None], mask=row_ok & (offs_t < HEAD_DIM)[:, None])
        per_offset = tl.dot(q_t, tab_t.to(q_t.dtype), per_offset, input_precision=PRECISION)
    j = tl.arange(0, KP)
    offset = tl.minimum(tl.maximum(pos[:, None] - j[None, :] + K - 1, 0), LP - 1)  # BLOCK_M, KP
    return tl.where((j < K)[None, :], tl.gather(per_offset, offset, axis=1), 0.0)


@triton.jit
def _tokens(
    idx, n, wy, wx, KH: tl.constexpr, KW: tl.constexpr, WINDOWS: tl.constexpr, IMG_H: tl.constexpr,
    IMG_W: tl.constexpr,
):  # fmt: skip
    """(token index, whether the token exists) of the grid indices idx < n. Tokens in grid order: the index itself.
    WINDOWS: the (wy, wx) window of a row-major (IMG_H, IMG_W) image, whose edge windows hang over the image
    (upstream pads it there); a token exists where its window position lies inside the image."""
    token, exists = idx, idx < n
    if WINDOWS:
        row, col = (wy * KH + idx // KW).to(tl.int32), (wx * KW + idx % KW).to(tl.int32)
        token, exists = row * IMG_W + col, exists & (row < IMG_H) & (col < IMG_W)
    return token, exists


@triton.jit
def _rel_pos_attention_fwd(
    q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, kb_ptr, vb_ptr,
    qk_scale, N_Q, HEADS,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d,
    KH: tl.constexpr, KW: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr, ONEHOT: tl.constexpr, KHP: tl.constexpr, KWP: tl.constexpr, REL_PRECISION: tl.constexpr,
    TABLES: tl.constexpr, LHP: tl.constexpr, LWP: tl.constexpr,
    WINDOWS: tl.constexpr, IMG_H: tl.constexpr, IMG_W: tl.constexpr, NWH: tl.constexpr, NWW: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, head) against all KH * KW keys, online softmax in base 2.

    The head dim is BLOCK_D columns (padded: BLOCK_D >= HEAD_DIM) and, if HEAD_DIM > BLOCK_D, a tail of BLOCK_T
    columns from BLOCK_D on (split: vit_h's 80 = 64 + 16). Columns past HEAD_DIM are masked to zero. The bias comes
    from `_onehot_bias` (ONEHOT) or per-key loads (`_rel_bias`); a key block that is one full grid row (BLOCK_N == KW)
    reuses the same rel_w slice every step, loaded once. TABLES (with ONEHOT, queries on the key grid): rh_ptr and
    rw_ptr hold the (2 KH - 1, HEAD_DIM) and (2 KW - 1, HEAD_DIM) position tables, and `_table_terms` computes each
    program's rel tiles from its own q.

    WINDOWS (with TABLES): each "batch" is one of NWH x NWW windows of KH x KW tokens of one image, read from and
    written to the unpadded (IMG_H, IMG_W) image in place (q, k, v, out strided per image token). Keys past the
    image's edge are upstream's padding: zero tokens after norm1, so their k and v are qkv's bias (kb_ptr, vb_ptr:
    (HEADS, HEAD_DIM) each). They are added as a score, only by the programs of the last window row and column
    (9 of SAM's 25 windows), and as one share of v_pad after the loop; the loaded K and V tiles go to the dots as
    loaded. Substituted into the tiles, each tile took one more trip through shared memory, and the windowed
    launches took 1.75x as long (reports/2026-12-07-h100-gelu-epilogue-image-windows-peer); added to acc inside the
    loop, in every window, 1.63x (reports/2026-12-07-h100-windows-kernel-fix-and-peer): ptxas serialized the
    wgmmas around that write (its warning C7515). Queries there are not stored."""
    n_q_blocks = tl.cdiv(N_Q, BLOCK_M)
    bh = tl.program_id(0) // n_q_blocks  # a head's query blocks run side by side and share its K/V in cache
    b, h = (bh // HEADS).to(tl.int64), (bh % HEADS).to(tl.int64)
    if WINDOWS:
        img, win = b // (NWH * NWW), b % (NWH * NWW)
        wy, wx = win // NWW, win % NWW
        # only the last window row and column hang over the image: the others skip the padding keys' terms
        edge = ((wy == NWH - 1) & (IMG_H % KH != 0)) | ((wx == NWW - 1) & (IMG_W % KW != 0))
    else:
        img, wy, wx, edge = b, 0, 0, False
    offs_m = (tl.program_id(0) % n_q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = BLOCK_D + tl.arange(0, BLOCK_T)
    tok_m, q_mask = _tokens(offs_m, N_Q, wy, wx, KH, KW, WINDOWS, IMG_H, IMG_W)
    d_mask, t_mask = offs_d < HEAD_DIM, offs_t < HEAD_DIM
    TAIL: tl.constexpr = HEAD_DIM > BLOCK_D

    q_base = q_ptr + img * sq_b + h * sq_h + tok_m[:, None] * sq_n
    q_raw = tl.load(q_base + offs_d[None, :] * sq_d, mask=q_mask[:, None] & d_mask[None, :], other=0.0)  # BLOCK_M, D
    q = (q_raw.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)  # scores come out in log2 units
    k_bh, v_bh = k_ptr + img * sk_b + h * sk_h, v_ptr + img * sv_b + h * sv_h
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)  # the tail's output columns (unused without a tail)
    if TAIL:
        q_t = tl.load(q_base + offs_t[None, :] * sq_d, mask=q_mask[:, None] & t_mask[None, :], other=0.0)
        q_t = (q_t.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)  # BLOCK_M, T
    if WINDOWS:  # the padding's k, one row of qkv's bias per head, enters as q · k_pad (v_pad: after the loop)
        kb = tl.load(kb_ptr + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # BLOCK_D
        q_kb = tl.sum(q.to(tl.float32) * kb[None, :], 1)  # BLOCK_M: every padding key's score (log2 units)
        if TAIL:
            kb_t = tl.load(kb_ptr + h * HEAD_DIM + offs_t, mask=t_mask, other=0.0).to(tl.float32)  # BLOCK_T
            q_kb += tl.sum(q_t.to(tl.float32) * kb_t[None, :], 1)
    rel_row = bh.to(tl.int64) * N_Q + offs_m  # rel_h, rel_w are contiguous (B * heads * N_Q, KH | KW)
    rh_row, rw_row = rh_ptr + rel_row * KH, rw_ptr + rel_row * KW
    if TABLES:
        rh_t = _table_terms(
            q_raw, q_base, sq_d, q_mask, rh_ptr, offs_m // KW, KH, KHP, LHP, HEAD_DIM, BLOCK_D, BLOCK_T, PRECISION
        )
        rw_t = _table_terms(
            q_raw, q_base, sq_d, q_mask, rw_ptr, offs_m % KW, KW, KWP, LWP, HEAD_DIM, BLOCK_D, BLOCK_T, PRECISION
        )
        rh_t, rw_t = rh_t.to(q_ptr.dtype.element_ty), rw_t.to(q_ptr.dtype.element_ty)  # as the terms' GEMM rounds
    elif ONEHOT:
        cols_h, cols_w = tl.arange(0, KHP), tl.arange(0, KWP)
        rh_t = tl.load(rh_row[:, None] + cols_h[None, :], mask=q_mask[:, None] & (cols_h < KH)[None, :], other=0.0)
        rw_t = tl.load(rw_row[:, None] + cols_w[None, :], mask=q_mask[:, None] & (cols_w < KW)[None, :], other=0.0)
    elif KW == BLOCK_N:  # every key block is one grid row: the same rel_w slice each step
        rw_t = tl.load(rw_row[:, None] + offs_n[None, :], mask=q_mask[:, None], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    l_pad = tl.zeros([BLOCK_M], tl.float32)  # the padding keys' share of it: their v enters acc after the loop
    for start_n in range(0, KH * KW, BLOCK_N):
        n_mask = start_n + offs_n < KH * KW
        tok_n, in_image = _tokens(start_n + offs_n, KH * KW, wy, wx, KH, KW, WINDOWS, IMG_H, IMG_W)
        k_cols, v_rows = k_bh + tok_n[None, :] * sk_n, v_bh + tok_n[:, None] * sv_n  # 1, BLOCK_N; BLOCK_N, 1
        # keys outside the image load as 0 and get their score from q_kb: the tiles go to the dots as loaded
        k = tl.load(k_cols + offs_d[:, None] * sk_d, mask=d_mask[:, None] & in_image[None, :], other=0.0)  # D, BLOCK_N
        s = tl.dot(q, k, input_precision=PRECISION)  # BLOCK_M, BLOCK_N
        if TAIL:
            k_t = tl.load(k_cols + offs_t[:, None] * sk_d, mask=t_mask[:, None] & in_image[None, :], other=0.0)
            s = tl.dot(q_t, k_t, s, input_precision=PRECISION)
        if WINDOWS:
            if edge:
                s += tl.where(in_image[None, :], 0.0, q_kb[:, None])
        if ONEHOT:
            s += _onehot_bias(rh_t, rw_t, start_n, offs_n, KW, KHP, KWP, REL_PRECISION) * LOG2E
        elif KW == BLOCK_N:
            rh = tl.load(rh_row + start_n // KW, mask=q_mask, other=0.0).to(tl.float32)
            s += (rh[:, None] + rw_t) * LOG2E
        else:
            s += _rel_bias(rh_row, rw_row, q_mask, start_n, offs_n, KH, KW, BLOCK_N) * LOG2E
        if (KH * KW) % BLOCK_N != 0:  # the last key block is partial
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows + offs_d[None, :] * sv_d, mask=in_image[:, None] & d_mask[None, :], other=0.0)  # BLOCK_N, D
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if TAIL:
            v_t = tl.load(v_rows + offs_t[None, :] * sv_d, mask=in_image[:, None] & t_mask[None, :], other=0.0)
            acc_t = acc_t * alpha[:, None] + tl.dot(p.to(v_t.dtype), v_t, input_precision=PRECISION)
        if WINDOWS:
            if edge:  # the padding keys' probabilities (p is 0 past the last key), rescaled as l_i is
                l_pad = l_pad * alpha + tl.sum(tl.where(in_image[None, :], 0.0, p), 1)  # BLOCK_M
        m_i = m_new
    if WINDOWS:  # all padding keys share one v: acc is not touched between the dots (that serialized them)
        vb = tl.load(vb_ptr + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)  # BLOCK_D
        acc += l_pad[:, None] * vb[None, :]
        if TAIL:
            vb_t = tl.load(vb_ptr + h * HEAD_DIM + offs_t, mask=t_mask, other=0.0).to(tl.float32)  # BLOCK_T
            acc_t += l_pad[:, None] * vb_t[None, :]
    o_base = o_ptr + img * so_b + h * so_h + tok_m[:, None] * so_n
    o_ty = o_ptr.dtype.element_ty
    row_mask = q_mask[:, None]
    tl.store(o_base + offs_d[None, :] * so_d, (acc / l_i[:, None]).to(o_ty), mask=row_mask & d_mask[None, :])
    if TAIL:
        tl.store(o_base + offs_t[None, :] * so_d, (acc_t / l_i[:, None]).to(o_ty), mask=row_mask & t_mask[None, :])


def dot_dim(n: int) -> int:
    """The smallest power of two >= n that a tl.dot takes (16 at least): a padded head dim, tail or rel-table width."""
    return max(16, triton.next_power_of_2(n))


def head_blocks(head_dim: int, split: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_T), both powers of two >= 16 (the smallest dot). Padded (split=False): BLOCK_D covers the
    head dim, no tail (80 -> 128). Split: the largest power of two <= head_dim plus a tail (80 -> 64 + 16)."""
    if not split:
        return dot_dim(head_dim), 16  # the tail block is never used
    main = max(16, 1 << (head_dim.bit_length() - 1))  # the largest power of two <= head_dim
    return main, dot_dim(max(head_dim - main, 1))


INTERPRETED = not isinstance(_rel_pos_attention_fwd, JITFunction)  # TRITON_INTERPRET=1 when this module loaded


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> None:
    """Raise ValueError unless the inputs fit the kernel (there is no fallback to another path)."""
    if not all(t.dim() == 4 for t in (q, k, v, rel_h, rel_w)):
        raise ValueError("rel_pos_attention: q, k, v, rel_h, rel_w must all be 4-D (B, heads, tokens, ...)")
    batch, heads, n_q, d = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    if k.shape != (batch, heads, kh * kw, d) or v.shape != k.shape:
        raise ValueError(f"rel_pos_attention: k, v must be {(batch, heads, kh * kw, d)}, got {k.shape}, {v.shape}")
    if rel_h.shape[:3] != (batch, heads, n_q) or rel_w.shape[:3] != (batch, heads, n_q):
        raise ValueError(f"rel_pos_attention: rel_h, rel_w must start {(batch, heads, n_q)}, got {rel_h.shape}, "
                         f"{rel_w.shape}")  # fmt: skip
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"rel_pos_attention: q, k, v must share one of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not rel_h.is_floating_point() or not rel_w.is_floating_point():
        raise ValueError(f"rel_pos_attention: rel_h, rel_w must be floating point, got {rel_h.dtype}, {rel_w.dtype}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"rel_pos_attention: head dim {d} > {MAX_HEAD_DIM}")
    if len({t.device for t in (q, k, v, rel_h, rel_w)}) != 1:
        raise ValueError("rel_pos_attention: all inputs must be on one device")


def _check_tables(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor):
    """(kh, kw) of the key grid the position tables (2 kh - 1, d), (2 kw - 1, d) give; ValueError unless the inputs
    fit the kernel with them: queries on the key grid, one-hot bias widths."""
    if q.dim() != 4 or table_h.dim() != 2 or table_w.dim() != 2:
        raise ValueError("rel_pos_attention_tables: q must be 4-D (B, heads, tokens, d), the tables 2-D (2 k - 1, d)")
    kh, kw = (len(table_h) + 1) // 2, (len(table_w) + 1) // 2
    terms = [q.new_empty(()).expand(*q.shape[:3], size) for size in (kh, kw)]  # shape-only stand-ins for `_check`
    _check(q, k, v, *terms)
    if len(table_h) % 2 == 0 or len(table_w) % 2 == 0 or q.shape[2] != kh * kw:
        raise ValueError(f"rel_pos_attention_tables: tables of odd lengths 2 k - 1 for queries on the k grid, got "
                         f"{len(table_h)}, {len(table_w)} for {q.shape[2]} queries")  # fmt: skip
    if table_h.shape[1] != q.shape[3] or table_w.shape[1] != q.shape[3] or q.device != table_h.device:
        raise ValueError("rel_pos_attention_tables: the tables must have q's head dim and device")
    if max(kh, kw) > 64:
        raise ValueError(f"rel_pos_attention_tables: grids of at most 64 x 64, got {kh} x {kw}")
    return kh, kw


def _check_windows(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor) -> tuple[int, int]:
    """(kh, kw) of the windows the position tables give; ValueError unless one window of q (B, heads, H * W, d)
    fits the kernel with them, as `_check_tables` checks it."""
    window = q[:, :, :1].expand(-1, -1, (len(table_h) + 1) // 2 * ((len(table_w) + 1) // 2), -1)  # B, heads, kh kw, d
    return _check_tables(window, window, window, table_h, table_w)


class Problem(NamedTuple):
    """What a launch's shared memory depends on besides the launch: the key grid, the head dim and the bytes of a
    q/k/v element and of a rel-term element (the one-hot bias holds rel tiles in the terms' dtype)."""

    kh: int
    kw: int
    head_dim: int
    itemsize: int
    rel_itemsize: int


class Fit(NamedTuple):
    """A launch (BLOCK_M, BLOCK_N, num_warps, num_stages, bias), its head-dim split, and how it was chosen: "table"
    (`default_launch`'s or as given), "stepped_down" (to fit the GPU) or "over_limit" (nothing fit; the smallest)."""

    launch: tuple[int, int, int, int, str]
    split: bool
    how: str


def device_limits(device: torch.device) -> tuple[int, tuple[int, int]] | None:
    """(opt-in shared memory per block in bytes, compute capability) of a CUDA device, as Triton checks a launch
    against; None elsewhere (Triton's CPU interpreter has no shared memory to fit)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.shared_memory_per_block_optin, (props.major, props.minor)


def shared_bytes(problem: Problem, launch: tuple, split: bool, capability: tuple[int, int]) -> int:
    """Estimated shared memory of one program of `_rel_pos_attention_fwd`, in bytes; an upper bound of Triton's own
    figure (the compiled kernel's `metadata.shared`, which it checks against the device before launching).

    What the kernel holds, for `cols` = BLOCK_D (+ BLOCK_T with a split head dim) head-dim columns:
      - K (cols, BLOCK_N) and V (BLOCK_N, cols) tiles, one pair per pipelined stage: Triton 3.6 keeps num_stages
        pairs on sm90 (wgmma) and num_stages - 1 on sm8x (mma + cp.async, one stage in registers); at least one;
      - the q tile (BLOCK_M, cols), a dot operand for the whole loop;
      - with the one-hot bias: the rel tiles (BLOCK_M, KHP + KWP) and the one-hot tiles (KHP + KWP, BLOCK_N), in
        the rel terms' dtype;
      - scratch: an fp32 (BLOCK_M, BLOCK_N) score tile changing layout, one fp32 per query row for the softmax's
        row reductions. The table terms' scratch (`_table_terms`, before the loop) is released before the loop
        and is smaller than what the loop holds.
    Triton's own figure comes from compiling, which needs no GPU (loading the kernel and reading `n_regs` do):
    tests/test_launch_fit.py compiles launches for sm80, sm86, sm89 and sm90 and checks this bound against it. In
    a sweep of 288 launches (Triton 3.6, sm80 and sm90) Triton's figure was 0.4 to 1.0 times this one."""
    bm, bn, _, stages, bias = launch
    block_d, block_t = head_blocks(problem.head_dim, split)
    cols = block_d + (block_t if problem.head_dim > block_d else 0)
    pairs = stages if capability >= (9, 0) else max(stages - 1, 1)
    kv = pairs * 2 * bn * cols * problem.itemsize
    q = bm * cols * problem.itemsize
    rel_cols = dot_dim(problem.kh) + dot_dim(problem.kw) if bias == "onehot" else 0
    rel = (bm + bn) * rel_cols * problem.rel_itemsize
    return kv + q + rel + bm * bn * 4 + bm * 4


def _halvings(block: int, given: bool) -> tuple[int, ...]:
    """block, block / 2, ... down to 16 (the smallest dot); only block itself if it was given."""
    return (block,) if given else tuple(block >> i for i in range(block.bit_length() - 4))


def _step_down(table: tuple, given: tuple):
    """`table`'s launch, then launches that hold less, in order of preference: fewer stages first (down to 1), then
    smaller BLOCK_N, then smaller BLOCK_M (each halved down to 16). Given values stay; num_warps, unless given,
    follows BLOCK_M (the table's warps per query row, at least 1)."""
    bm0, bn0, warps0, stages0, bias = table
    for bm in _halvings(bm0, bool(given[0])):
        for bn in _halvings(bn0, bool(given[1])):
            for stages in (stages0,) if given[3] else range(stages0, 0, -1):
                yield bm, bn, given[2] or max(1, warps0 * bm // bm0), stages, bias


def _filled(problem: Problem, given: tuple, split: bool) -> tuple:
    """The launch parameters given, 0 or "" filled in from `default_launch`."""
    table = default_launch(problem.kh * problem.kw, problem.head_dim, problem.itemsize, split)
    return tuple(g or t for g, t in zip(given, table))


def fit_launch(problem: Problem, given: tuple, split: bool, limit: int, capability: tuple[int, int]) -> Fit:
    """The first launch whose `shared_bytes` is at most `limit` (opt-in shared memory per block, bytes) on a GPU of
    `capability`: the table's (`default_launch`, with what was given), else `_step_down`'s order, else the same
    with the head dim split if padding it did not fit (80: 64 + 16 columns held instead of 128).

    If none fits: ValueError if block_m, block_n or num_stages were given (those the user chose do not fit);
    otherwise the smallest launch, as "over_limit": the estimate is an upper bound, so it may still fit, and if it
    does not, Triton refuses it with its own out-of-resource error."""
    pow2 = problem.head_dim & (problem.head_dim - 1) == 0
    for s in (split,) if split or pow2 else (False, True):
        table = _filled(problem, given, s)
        for launch in _step_down(table, given):
            if shared_bytes(problem, launch, s, capability) <= limit:
                return Fit(launch, s, "table" if (launch, s) == (table, split) else "stepped_down")
    need = shared_bytes(problem, launch, s, capability)
    if given[0] or given[1] or given[3]:
        bm, bn, _, stages, _ = launch
        raise ValueError(
            f"rel_pos_attention: BLOCK_M {bm}, BLOCK_N {bn}, {stages} stages need ~{need / 1024:.0f} KiB of shared "
            f"memory, over this GPU's {limit / 1024:.0f} KiB per block (sm{capability[0]}{capability[1]}): give "
            "smaller values, or 0 to have them fitted"
        )
    return Fit(launch, s, "over_limit")


def _launch(q: torch.Tensor, kh: int, kw: int, rel_dtype: torch.dtype, given: tuple, split: bool) -> Fit:
    """The launch parameters given, 0 or "" filled in from `default_launch` and stepped down to fit q's GPU
    (`fit_launch`); raise ValueError on invalid ones."""
    problem = Problem(kh, kw, q.shape[-1], q.element_size(), rel_dtype.itemsize)
    table = _filled(problem, given, split)
    bm, bn, _, _, bias = table
    if not all(16 <= b <= MAX_BLOCK and b & (b - 1) == 0 for b in (bm, bn)):
        raise ValueError(f"rel_pos_attention: block sizes must be powers of two in [16, {MAX_BLOCK}], got {bm}, {bn}")
    if bias not in BIAS_MODES:
        raise ValueError(f"rel_pos_attention: bias must be one of {BIAS_MODES} or '', got {bias!r}")
    limits = device_limits(q.device)
    return Fit(table, split, "table") if limits is None else fit_launch(problem, given, split, *limits)


def _tables_launch(q: torch.Tensor, kh: int, kw: int, blocks: tuple[int, int, int, int], split: bool) -> Fit:
    """`_launch` for the kernels that compute the rel terms from the tables (in q's dtype), which always take the
    one-hot bias; `blocks`: block_m, block_n, num_warps, num_stages as given."""
    return _launch(q, kh, kw, q.dtype, (*blocks, "onehot"), split)


def _count(fit: Fit) -> None:
    """Count a launch stepped down or over the limit under its own key (`_run` counts every call under PATH)."""
    if fit.how != "table":
        key = f"{PATH}.{fit.how}"
        COUNTERS[key] = COUNTERS.get(key, 0) + 1


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """(B, heads, N_q, d) laid out as (B, N_q, heads, d): the encoder's proj then needs no transposing copy."""
    batch, heads, n_q, d = q.shape
    return q.new_empty(batch, n_q, heads, d).transpose(1, 2)


@torch.library.custom_op("samrepro::rel_pos_attention", mutates_args=())
def rel_pos_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
    split_head: bool = False,
    bias: str = "",
) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias) @ v, bias(q, key) = rel_h[q, key // kw] + rel_w[q, key % kw].

    Args:
        q: (B, heads, N_q, d); k, v: (B, heads, kh * kw, d), keys in row-major grid order.
        rel_h: (B, heads, N_q, kh); rel_w: (B, heads, N_q, kw).
        scale: softmax scale, applied to q @ k^T only (the bias is added unscaled, as in SAM).
        block_m, block_n, num_warps, num_stages: launch parameters; 0 takes `default_launch`'s, stepped down to
            fit the GPU's shared memory (`fit_launch`); given ones that cannot fit raise ValueError.
        split_head: a head dim that is not a power of two runs as a power of two plus a tail instead of padded
            (also when padded does not fit the GPU).
        bias: "gather" (per-key loads), "onehot" (tensor-core dots with one-hot key rows and columns); "" takes
            `default_launch`'s.
    """
    _check(q, k, v, rel_h, rel_w)
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    rel_dtype = torch.promote_types(rel_h.dtype, rel_w.dtype)
    fit = _launch(q, kh, kw, rel_dtype, (block_m, block_n, num_warps, num_stages, bias), split_head)
    _count(fit)
    return _run(q, k, v, rel_h, rel_w, scale, kh, kw, fit.launch, fit.split, tables=False)


@rel_pos_attention_op.register_fake
def _(q, k, v, rel_h, rel_w, scale, block_m=0, block_n=0, num_warps=0, num_stages=0, split_head=False, bias=""):
    _check(q, k, v, rel_h, rel_w)
    rel_dtype = torch.promote_types(rel_h.dtype, rel_w.dtype)
    _launch(q, rel_h.shape[-1], rel_w.shape[-1], rel_dtype, (block_m, block_n, num_warps, num_stages, bias), split_head)
    return _empty_out(q)


@torch.library.custom_op("samrepro::rel_pos_attention_tables", mutates_args=())
def rel_pos_attention_tables_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    scale: float,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
    split_head: bool = False,
) -> torch.Tensor:
    """`rel_pos_attention` for queries on the key grid (SAM's windows), its rel terms computed inside the kernel
    from the position tables: rel_h[q, j] = q · table_h[row(q) - j + kh - 1], rel_w[q, j] = q · table_w[col(q) -
    j + kw - 1] (upstream's `get_rel_pos` without interpolation), rounded to q's dtype; always the one-hot bias.

    Args:
        q, k, v: as for `rel_pos_attention`, with N_q = kh * kw; table_h: (2 kh - 1, d); table_w: (2 kw - 1, d).
    """
    kh, kw = _check_tables(q, k, v, table_h, table_w)
    fit = _tables_launch(q, kh, kw, (block_m, block_n, num_warps, num_stages), split_head)
    _count(fit)
    # Column-major q/k/v (sparse24's transposed GEMM output: token stride 1) make this path fault on H100 and H200
    # with an illegal memory access; row-major copies do not (reports/2026-12-05-h200-sparse24-layout-fix)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _run(q, k, v, table_h.to(q.dtype), table_w.to(q.dtype), scale, kh, kw, fit.launch, fit.split, tables=True)


@rel_pos_attention_tables_op.register_fake
def _(q, k, v, table_h, table_w, scale, block_m=0, block_n=0, num_warps=0, num_stages=0, split_head=False):
    kh, kw = _check_tables(q, k, v, table_h, table_w)
    _tables_launch(q, kh, kw, (block_m, block_n, num_warps, num_stages), split_head)
    return _empty_out(q)


def _window_inputs(qkv: torch.Tensor, qkv_bias: torch.Tensor, heads: int):
    """q, k, v (B, heads, H * W, d) as views of the qkv Linear's output (B, H, W, 3 * heads * d), and the k and v
    of a zero token (heads, d) from its bias; ValueError where the shapes do not fit."""
    if qkv.dim() != 4 or heads < 1 or qkv.shape[-1] % (3 * heads) != 0:
        raise ValueError(f"rel_pos_attention_windows: qkv must be (B, H, W, 3 * {heads} * d), got {tuple(qkv.shape)}")
    batch, height, width, channels = qkv.shape
    if qkv_bias.shape != (channels,) or qkv_bias.device != qkv.device:
        raise ValueError(f"rel_pos_attention_windows: qkv_bias must be ({channels},) on {qkv.device}, got "
                         f"{tuple(qkv_bias.shape)} on {qkv_bias.device}")  # fmt: skip
    q, k, v = qkv.view(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # B, heads, HW, d
    _, k_pad, v_pad = qkv_bias.to(qkv.dtype).contiguous().view(3, heads, -1).unbind(0)  # heads, d each: contiguous
    return q, k, v, k_pad, v_pad


@torch.library.custom_op("samrepro::rel_pos_attention_windows", mutates_args=())
def rel_pos_attention_windows_op(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    heads: int,
    scale: float,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
    split_head: bool = False,
) -> torch.Tensor:
    """SAM's windowed attention read from and written to the unpadded image: `rel_pos_attention_tables` on each
    kh x kw window (kh, kw from the tables), the image padded at its bottom and right edges to whole windows as
    upstream's `window_partition` does. Its padding tokens are zeros after norm1, so their k and v are the bias;
    nothing is copied into windows and back, and qkv and proj run on the image's own tokens only.

    Args:
        qkv: (B, H, W, 3 * heads * d), the qkv Linear's output on the image (channels q | k | v, each heads-major).
        qkv_bias: (3 * heads * d,), that Linear's bias.
        table_h, table_w: (2 kh - 1, d), (2 kw - 1, d).
    Returns:
        (B, H, W, heads * d), channels heads-major as upstream's attention output before proj.
    """
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()  # column-major (sparse24): as the tables op, row-major
    q, k, v, k_pad, v_pad = _window_inputs(qkv, qkv_bias, heads)
    kh, kw = _check_windows(q, table_h, table_w)
    fit = _tables_launch(q, kh, kw, (block_m, block_n, num_warps, num_stages), split_head)
    _count(fit)
    windows = ImageWindows(qkv.shape[1], qkv.shape[2], k_pad, v_pad)
    out = _run(q, k, v, table_h.to(q.dtype), table_w.to(q.dtype), scale, kh, kw, fit.launch, fit.split, True, windows)
    return out.transpose(1, 2).reshape(*qkv.shape[:3], -1)  # the kernel wrote (B, HW, heads, d): a view


@rel_pos_attention_windows_op.register_fake
def _(qkv, qkv_bias, table_h, table_w, heads, scale, block_m=0, block_n=0, num_warps=0, num_stages=0,
      split_head=False):  # fmt: skip
    q, _, _, _, _ = _window_inputs(qkv, qkv_bias, heads)
    kh, kw = _check_windows(q, table_h, table_w)
    _tables_launch(q, kh, kw, (block_m, block_n, num_warps, num_stages), split_head)
    return qkv.new_empty(*qkv.shape[:3], q.shape[1] * q.shape[3])


class ImageWindows(NamedTuple):
    """`_run`'s q, k, v as tokens of unpadded (height, width) images, cut into the key grid's windows by the kernel,
    and the (heads, d) k and v of the padding tokens where the edge windows hang over the image."""

    height: int
    width: int
    k_pad: torch.Tensor
    v_pad: torch.Tensor


def _run(
    q, k, v, rel_h, rel_w, scale: float, kh: int, kw: int, launch: tuple, split_head: bool, tables: bool,
    windows: ImageWindows | None = None,
):  # fmt: skip
    """Launch the kernel: rel_h, rel_w are the terms (B, heads, N_q, kh | kw), or the tables when `tables`; with
    `windows`, q, k, v are (B, heads, height * width, d) and every window of every image is one batch entry."""
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"rel_pos_attention runs on CUDA tensors (on CPU: TRITON_INTERPRET=1), not {q.device}")
    batch, heads, n_q, d = q.shape
    bm, bn, warps, stages, bias = launch
    rel_dtype = torch.promote_types(rel_h.dtype, rel_w.dtype)  # the one-hot dots take one dtype; upcasting is exact
    COUNTERS[PATH] = COUNTERS.get(PATH, 0) + 1  # here, not in traced code: a dynamo-traced count would recompile
    out = _empty_out(q)
    img_h = img_w = 0
    n_wh = n_ww = 1
    k_pad = v_pad = q  # not read outside window mode: passed as it is, never copied
    if windows is not None:
        img_h, img_w, k_pad, v_pad = windows
        n_wh, n_ww, n_q = triton.cdiv(img_h, kh), triton.cdiv(img_w, kw), kh * kw
    block_d, block_t = head_blocks(d, split_head)
    grid = (batch * n_wh * n_ww * heads * triton.cdiv(n_q, bm),)
    _rel_pos_attention_fwd[grid](
        q, k, v, rel_h.to(rel_dtype).contiguous(), rel_w.to(rel_dtype).contiguous(), out,
        k_pad, v_pad,
        scale * LOG2E.value, n_q, heads,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        KH=kh, KW=kw, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_T=block_t,
        PRECISION="ieee" if q.dtype == torch.float32 else None, ONEHOT=bias == "onehot",
        KHP=dot_dim(kh), KWP=dot_dim(kw),
        REL_PRECISION="ieee" if rel_dtype == torch.float32 else None,
        TABLES=tables, LHP=dot_dim(2 * kh - 1), LWP=dot_dim(2 * kw - 1),
        WINDOWS=windows is not None, IMG_H=img_h, IMG_W=img_w, NWH=n_wh, NWW=n_ww,
        num_warps=warps, num_stages=stages, maxnreg=WINDOWS_MAXNREG if windows is not None else None,
    )  # fmt: skip
    return out


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same attention with the (N_q, kh * kw) bias materialised and the softmax in fp32, in q's dtype."""
    bias = (rel_h.float()[..., :, None] + rel_w.float()[..., None, :]).flatten(-2)  # B, heads, N_q, kh * kw
    attn = torch.softmax(scale * q.float() @ k.float().transpose(-1, -2) + bias, dim=-1)
    return (attn @ v.float()).to(q.dtype)
