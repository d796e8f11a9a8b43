"""fp8_fused: fp8's row-wise float8 encoder Linears with each activation quantized in one Triton pass, the
MLP's GELU computed inside lin2's quantization and the LayerNorm before the MLP inside lin1's (beyond the blog;
the float8 scheme is `fp8`'s).

The same numbers as `fp8` (e4m3, one scale per token and per output channel, `torch._scaled_mm`), built without
torchao: each Linear becomes an `Fp8RowLinear` whose input goes through `samrepro::fp8_rows`; each block's
`mlp.act` and `norm2` become identities, so lin2 quantizes GELU(lin1's output) and lin1 norm2(x) from fp32,
without writing either out in bf16 first. Under inductor, torchao's quantization of vit_h's MLP input ran ~3-4x
off the memory bound and gave back most of what the float8 GEMMs saved
(reports/2026-11-21-h100-fold_attn-split-windows-and-peer). Undo puts the original modules back; their weights wait
on the host meanwhile.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn

from samrepro.kernels import COUNTERS
from samrepro.patch import Patch, PatchError, Requires, Undo
from samrepro.patches._float8 import TOLERANCE, Fp8Config
from samrepro.patches._host import park_on_host
from samrepro.patches._weights import WEIGHTS_SLOT, encoder_linears, require_multiples
from samrepro.registry import register_patch

OUT_DTYPE = torch.bfloat16  # _scaled_mm's row-wise path writes bf16


class Fp8RowLinear(nn.Module):
    """x @ w.T + b as torch._scaled_mm of x quantized per row and w per output channel; x goes through `norm` (a
    LayerNorm over its last dim) first if given, through GELU if `gelu`. Returns x's dtype."""

    def __init__(self, linear: nn.Linear, gelu: bool, config: Fp8Config, norm: nn.LayerNorm | None = None) -> None:
        from samrepro.kernels import fp8_rows  # noqa: F401  registers torch.ops.samrepro.fp8_rows

        super().__init__()
        self.gelu, self.lb, self.fast_accum = gelu, config.activation_value_lb, config.fast_accum
        self.eps = 0.0 if norm is None else norm.eps
        self.register_buffer("norm_weight", None if norm is None else norm.weight.detach())
        self.register_buffer("norm_bias", None if norm is None else norm.bias.detach())
        weight, scale = torch.ops.samrepro.fp8_rows(linear.weight.detach(), False, self.lb)  # out, in; out, 1
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.t().contiguous())  # 1, out
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(OUT_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # M, in; lin1's input, the residual, may come strided
        rows, scale = torch.ops.samrepro.fp8_rows(flat, self.gelu, self.lb, self.norm_weight, self.norm_bias, self.eps)
        out = torch._scaled_mm(
            rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=OUT_DTYPE,
            use_fast_accum=self.fast_accum,
        )  # fmt: skip
        return out.view(*x.shape[:-1], -1).to(x.dtype)  # ..., out

    def extra_repr(self) -> str:
        norm = self.norm_weight is not None
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, gelu={self.gelu}, norm={norm}"


def _exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


def _row_norm(norm: nn.Module, dim: int) -> bool:
    """A LayerNorm over the last dim with weight and bias, as the kernel computes it."""
    affine = type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
    return affine and tuple(norm.normalized_shape) == (dim,)


def _apply(sam: Sam, config: Fp8Config, undo: Undo) -> None:
    linears = encoder_linears(sam)
    require_multiples(linears, 16, "fp8_fused", "torch._scaled_mm")
    blocks = sam.image_encoder.blocks
    if len(blocks) * 4 != len(linears):
        raise PatchError(f"fp8_fused: expected 4 Linears per block (qkv, proj, lin1, lin2), got {sorted(linears)}")
    if not all(_exact_gelu(block.mlp.act) for block in blocks):
        raise PatchError("fp8_fused: every encoder MLP must use nn.GELU() (erf), which its lin2 quantization computes")
    if not all(_row_norm(block.norm2, block.mlp.lin1.in_features) for block in blocks):
        raise PatchError("fp8_fused: every block's norm2 must be an affine nn.LayerNorm over the channels (lin1's)")
    for block in blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "lin2")):
            undo.setattr(parent, name, Fp8RowLinear(getattr(parent, name), name == "lin2", config))
        undo.setattr(block.mlp, "lin1", Fp8RowLinear(block.mlp.lin1, False, config, norm=block.norm2))
        undo.setattr(block.mlp, "act", nn.Identity())
        undo.setattr(block, "norm2", nn.Identity())
    park_on_host([p for linear in linears.values() for p in linear.parameters()], undo)
    COUNTERS["fp8_fused.layers"] = COUNTERS.get("fp8_fused.layers", 0) + len(linears)


PATCH = register_patch(
    Patch(
        name="fp8_fused",
        summary="fp8's float8 row-wise encoder Linears, activations quantized by one Triton pass, GELU fused in",
        config_cls=Fp8Config,
        apply_fn=_apply,
        tolerance=TOLERANCE,  # the same quantization; GELU and norm2 in fp32, not rounded to bf16 first
        requires=Requires(devices=("cuda",), min_capability=(8, 9), packages=("triton",)),
        changes_weights=True,
        slots=(WEIGHTS_SLOT,),
    )
)
