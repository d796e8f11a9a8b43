"""Row-wise dynamic float8 (e4m3) quantization in one kernel, optionally through a LayerNorm or SAM's exact GELU.

For each row r of x (M, K), with f the erf GELU or the identity, after an optional LayerNorm, computed in fp32:
    a[r] = max(max_k |f(x[r, k])|, lb),   s[r] = a[r] / 448,   q[r, k] = e4m3(clamp(f(x[r, k]) * (448 / a[r]))),
torchao's row-wise float8 activation scaling (it divides by s instead: the codes may differ in the last bit). A
program whose chunk covers its rows reads them once; otherwise twice (for the max, then for the codes; the second
read is meant to hit L2, not measured). It writes q once; GELU is computed once per element. Under inductor the same
quantization ran ~3-4x off the memory bound on vit_h's MLP
(reports/2026-11-21-h100-fold_attn-split-windows-and-peer); this kernel: vit_h lin2's input 0.67 ms against
inductor's 1.92 and the bf16 GELU alone 0.56 (reports/2026-11-21-h100-fp8_fused-and-relgemm). With the LayerNorm, a
first pass takes each row's mean and variance, and the normalized rows are never written in bf16.

Registered as the custom op `samrepro::fp8_rows` with a fake implementation, as rel_pos_attention is (and for
the same reason: tests run it in Triton's CPU interpreter). Forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from samrepro.kernels import COUNTERS

PATH = "fp8_rows.triton"
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 16384  # one row lives in one program's registers


GELU_MIN = tl.constexpr(0.17)  # |GELU(x)| < 0.16998 for every x < 0 (its minimum, at x = -0.7518)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _chunk(ptrs, start, row_ok, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns start .. start + BLOCK_K of the program's rows in fp32 (0 outside), and their mask."""
    mask = row_ok[:, None] & (start + tl.arange(0, BLOCK_K) < K)[None, :]
    return tl.load(ptrs + start, mask=mask, other=0.0).to(tl.float32), mask  # BM, BK


@triton.jit
def _row_stats(ptrs, row_ok, eps, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each row's mean and 1 / sqrt(variance + eps), the variance biased as LayerNorm's: chunk means and squared
    deviations merged chunk by chunk (Chan et al.), which does not cancel as E[x^2] - E[x]^2 would."""
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)  # sum of squared deviations from the running mean
    seen = tl.zeros((1,), tl.float32)  # columns merged so far
    for start in range(0, K, BLOCK_K):
        x, mask = _chunk(ptrs, start, row_ok, K, BLOCK_K)
        n = tl.sum((start + tl.arange(0, BLOCK_K) < K).to(tl.float32), axis=0)  # this chunk's columns
        chunk_mean = tl.sum(x, axis=1) / n  # BM
        dev = tl.where(mask, x - chunk_mean[:, None], 0.0)  # BM, BK
        delta = chunk_mean - mean  # BM
        total = seen + n
        mean += delta * (n / total)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (seen * n / total)
        seen = total
    return mean, tl.math.rsqrt(m2 / K + eps)


@triton.jit
def _values(ptrs, w_ptr, b_ptr, start, row_ok, mean, rstd, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """`_chunk`'s columns, through the LayerNorm (x - mean) * rstd * w + b if NORM (0 outside the rows)."""
    x, mask = _chunk(ptrs, start, row_ok, K, BLOCK_K)
    if NORM:
        cols = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)  # BK
        b = tl.load(b_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)  # BK
        x = tl.where(mask, (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :], 0.0)
    return x, mask


@triton.jit
def _chunked_amax(ptrs, w_ptr, b_ptr, row_ok, mean, rstd, K: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """(BLOCK_M,) max |x| (after GELU) over the rows' chunks. With GELU a first pass takes max x only: GELU increases
    above -0.75 and stays under GELU_MIN in magnitude below 0, so max |GELU(x)| = GELU(max x) whenever that reaches
    GELU_MIN; other rows take a second pass."""
    peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # max x with GELU, else max |x|
    for start in range(0, K, BLOCK_K):
        x, mask = _values(ptrs, w_ptr, b_ptr, start, row_ok, mean, rstd, K, BLOCK_K, NORM)
        if not GELU:
            x = tl.abs(x)
        peak = tl.maximum(peak, tl.max(tl.where(mask, x, float("-inf")), axis=1))
    if GELU:
        amax = _gelu(peak)
        if tl.min(tl.where(row_ok, amax, GELU_MIN)) < GELU_MIN:  # some row never reaches GELU_MIN: look at them all
            amax = tl.zeros((BLOCK_M,), tl.float32)
            for start in range(0, K, BLOCK_K):
                x, _ = _values(ptrs, w_ptr, b_ptr, start, row_ok, mean, rstd, K, BLOCK_K, NORM)
                amax = tl.maximum(amax, tl.max(tl.abs(_gelu(x)), axis=1))
    else:
        amax = peak
    return amax


@triton.jit
def _fp8_rows_fwd(
    x_ptr, q_ptr, s_ptr, w_ptr, b_ptr, M, stride_xm, lb, eps, K: tl.constexpr,
    GELU: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Two passes over (BLOCK_M, BLOCK_K) chunks of the rows: their max, then scale and store (the rows are still in
    L2); where BLOCK_K covers the rows, one read. NORM: a pass for the rows' statistics first; the other passes see
    the normalized rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ptrs = x_ptr + rows[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # BM, BK
    mean = tl.zeros((BLOCK_M,), tl.float32)
    rstd = tl.zeros((BLOCK_M,), tl.float32)
    if NORM:
        mean, rstd = _row_stats(ptrs, row_ok, eps, K, BLOCK_M, BLOCK_K)
    if BLOCK_K >= K:  # one chunk holds the rows: read once, kept in registers for the store
        row, row_mask = _values(ptrs, w_ptr, b_ptr, 0, row_ok, mean, rstd, K, BLOCK_K, NORM)
        if GELU:
            row = _gelu(row)
        amax = tl.max(tl.where(row_mask, tl.abs(row), 0.0), axis=1)
    else:
        amax = _chunked_amax(ptrs, w_ptr, b_ptr, row_ok, mean, rstd, K, GELU, NORM, BLOCK_M, BLOCK_K)
    amax = tl.maximum(amax, lb)
    inv = tl.math.div_rn(tl.full((BLOCK_M,), 448.0, tl.float32), amax)  # IEEE, as torch divides
    tl.store(s_ptr + rows, tl.math.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32)), mask=row_ok)
    out = q_ptr + rows[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    if BLOCK_K >= K:
        q = tl.clamp(row * inv[:, None], -448.0, 448.0)
        tl.store(out, q.to(q_ptr.dtype.element_ty), mask=row_mask)
    else:
        for start in range(0, K, BLOCK_K):
            x, mask = _values(ptrs, w_ptr, b_ptr, start, row_ok, mean, rstd, K, BLOCK_K, NORM)
            if GELU:
                x = _gelu(x)
            q = tl.clamp(x * inv[:, None], -448.0, 448.0)
            tl.store(out + start, q.to(q_ptr.dtype.element_ty), mask=mask)


INTERPRETED = not isinstance(_fp8_rows_fwd, JITFunction)  # TRITON_INTERPRET=1 when this module loaded


def default_launch(k: int, norm: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): rows of 768 to 2048 elements without the LayerNorm one per program, read once
    (1x2048, 4 warps); wider rows (lin2's input, with GELU) in chunks of 1024 columns; narrower ones in chunks of the
    largest power of two <= K / 2, about 1024 elements per program; 256 wide with the LayerNorm. From the H100
    sweeps at M = 78,400, ms against the first table's: vit_h K = 5120 with GELU 1x1024 0.670 (2x1024 0.720),
    K = 1280 2x512 0.127 (8x256 0.162); vit_b K = 768 4x256 0.105 (8x256 0.114), K = 3072 with GELU 1x1024 0.417
    (2x1024 0.408) (reports/2026-11-21-h100-fp8_fused-and-relgemm); vit_h K = 1280 with the norm 4x256 0.183, 2x512
    0.263 (reports/2026-11-22-h100-fp8-norm-fusion-and-peer); read once: vit_b K = 768 0.080 against 0.099 chunked,
    vit_h K = 1280 0.106 against 0.113, but slower with GELU (K = 3072 0.474 against 0.423, K = 5120 0.689 against
    0.674) and with the norm (reports/2026-12-07-h100-vit_b-stacks-profile-fp8-one-read)."""
    if not norm and 768 <= k <= 2048:
        return 1, 2048, 4
    block_k = 256 if norm else 1024 if k >= 2048 else max(16, 1 << (k // 2).bit_length() - 1)
    return max(1, 1024 // block_k), block_k, 4


# Launches are not fitted to the GPU's shared memory, unlike rel_pos_attention's: this kernel has no dots and its
# loads go to registers, so shared memory holds only the row reductions' scratch. Triton 3.6 allocates 16 bytes for
# the default launches without the LayerNorm and 512 with it (sm89, sm90), against 99 KiB on the smallest sm89+ GPUs;
# tests/test_launch_fit.py compiles SAM's launches, and others, and checks they stay under 4 KiB.


def _check(x: torch.Tensor, lb: float, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"fp8_rows takes a 2-d fp16/bf16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] > MAX_K or x.stride(1) != 1:
        raise ValueError(f"fp8_rows needs rows of at most {MAX_K} contiguous elements, got {tuple(x.shape)}")
    if not lb > 0:
        raise ValueError(f"fp8_rows: the floor lb must be positive (zero rows would quantize to 0/0), got {lb}")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("fp8_rows: the LayerNorm takes both norm_weight and norm_bias, or neither")
    for t in () if norm_weight is None else (norm_weight, norm_bias):
        if t.shape != x.shape[1:] or not t.is_contiguous() or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"fp8_rows: norm_weight and norm_bias must be contiguous floats of shape ({x.shape[1]},) "
                             f"on {x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")  # fmt: skip


def _empty(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) e4m3 values and (M, 1) fp32 scales, the layouts torch._scaled_mm takes for its row-wise operand."""
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@torch.library.custom_op("samrepro::fp8_rows", mutates_args=())
def fp8_rows(
    x: torch.Tensor,
    gelu: bool,
    lb: float,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    block_m: int = 0,
    block_k: int = 0,
    num_warps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with y ≈ s * q row by row; x (M, K), q (M, K) e4m3, s (M, 1) fp32.

    y is x, LayerNorm(x) (over each row, with `eps`) when norm_weight and norm_bias (K,) are given, then through
    GELU when `gelu`. `lb` floors each row's max |y| (a zero row gets scale lb / 448, not 0); block_m, block_k
    (powers of two), num_warps: 0 takes `default_launch`'s."""
    _check(x, lb, norm_weight, norm_bias)
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"fp8_rows runs on CUDA tensors (on CPU: TRITON_INTERPRET=1), not {x.device}")
    (m, k), given = x.shape, (block_m, block_k, num_warps)
    norm = norm_weight is not None
    bm, bk, warps = (g or d for g, d in zip(given, default_launch(x.shape[1], norm)))
    COUNTERS[PATH] = COUNTERS.get(PATH, 0) + 1
    q, s = _empty(x)
    w, b = (norm_weight, norm_bias) if norm else (x, x)  # unread without the norm
    _fp8_rows_fwd[(triton.cdiv(m, bm),)](
        x, q, s, w, b, m, x.stride(0), lb, eps, K=k, GELU=gelu, NORM=norm, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps
    )
    return q, s


@fp8_rows.register_fake
def _(x, gelu, lb, norm_weight=None, norm_bias=None, eps=1e-5, block_m=0, block_k=0, num_warps=0):
    _check(x, lb, norm_weight, norm_bias)
    return _empty(x)


def reference(
    x: torch.Tensor, gelu: bool, lb: float, norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization in torch ops, `norm` (weight, bias, eps): (M, K) e4m3, (M, 1) fp32."""
    x = x.float()
    if norm is not None:
        weight, bias, eps = norm
        x = torch.nn.functional.layer_norm(x, x.shape[1:], weight.float(), bias.float(), eps)
    if gelu:
        x = torch.nn.functional.gelu(x)
    amax = x.abs().amax(dim=1, keepdim=True).clamp(min=lb)  # M, 1
    fp8_max = torch.full_like(amax, FP8_MAX)  # tensor / tensor divides in IEEE; torch multiplies by 1 / a scalar
    return (x * (fp8_max / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / fp8_max
