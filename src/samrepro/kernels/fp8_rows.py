"""Row-wise dynamic float8 (e4m3) quantization in one pass over the input, optionally through SAM's exact GELU.

For each row r of x (M, K), with f the erf GELU or the identity, computed in fp32:
    s[r] = max(max_k |f(x[r, k])|, lb) / 448,   q[r, k] = e4m3(clamp(f(x[r, k]) / s[r], -448, 448)),
torchao's row-wise float8 activation scaling. Each program holds whole rows in registers, so x is read once and
q written once. Under inductor the same quantization ran ~3-4x off the memory bound on vit_h's MLP
(reports/h100-session5).

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


@triton.jit
def _fp8_rows_fwd(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, lb,
    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # BM, BK
    if GELU:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), lb) / 448.0  # BM
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)  # IEEE division, as torch divides
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < M)


INTERPRETED = not isinstance(_fp8_rows_fwd, JITFunction)  # TRITON_INTERPRET=1 when this module loaded


def default_launch(k: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): about 4K elements per program, one warp per 512 of them."""
    block_k = triton.next_power_of_2(k)
    block_m = max(1, 4096 // block_k)
    return block_m, max(1, min(16, block_m * block_k // 512))


def _check(x: torch.Tensor, lb: float) -> None:
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"fp8_rows takes a 2-d fp16/bf16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] > MAX_K or x.stride(1) != 1:
        raise ValueError(f"fp8_rows needs rows of at most {MAX_K} contiguous elements, got {tuple(x.shape)}")
    if not lb > 0:
        raise ValueError(f"fp8_rows: the floor lb must be positive (zero rows would quantize to 0/0), got {lb}")


def _empty(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) e4m3 values and (M, 1) fp32 scales, the layouts torch._scaled_mm takes for its row-wise operand."""
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@torch.library.custom_op("samrepro::fp8_rows", mutates_args=())
def fp8_rows(
    x: torch.Tensor, gelu: bool, lb: float, block_m: int = 0, num_warps: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with x ≈ s * q row by row (of GELU(x) when `gelu`); x (M, K), q (M, K) e4m3, s (M, 1) fp32.
    `lb` floors each row's max |x| (a zero row gets scale lb / 448, not 0); block_m, num_warps: 0 takes
    `default_launch`'s."""
    _check(x, lb)
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"fp8_rows runs on CUDA tensors (on CPU: TRITON_INTERPRET=1), not {x.device}")
    (m, k), (bm, warps) = x.shape, default_launch(x.shape[1])
    bm, warps = block_m or bm, num_warps or warps
    COUNTERS[PATH] = COUNTERS.get(PATH, 0) + 1
    q, s = _empty(x)
    _fp8_rows_fwd[(triton.cdiv(m, bm),)](
        x, q, s, m, k, x.stride(0), lb, GELU=gelu, BLOCK_M=bm, BLOCK_K=triton.next_power_of_2(k), num_warps=warps
    )
    return q, s


@fp8_rows.register_fake
def _(x, gelu, lb, block_m=0, num_warps=0):
    _check(x, lb)
    return _empty(x)


def reference(x: torch.Tensor, gelu: bool, lb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization in torch ops: (M, K) e4m3, (M, 1) fp32."""
    x = x.float()
    if gelu:
        x = torch.nn.functional.gelu(x)
    s = x.abs().amax(dim=1, keepdim=True).clamp(min=lb) / FP8_MAX  # M, 1
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s
