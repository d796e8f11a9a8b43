"""gelu_epilogue: each encoder MLP's lin1 and GELU as one GEMM that adds the bias and applies GELU in its epilogue
(`torch._addmm_activation`; cuBLASLt's GELU epilogue on CUDA), beyond the blog.

Upstream writes lin1's (tokens, 4C) output, then a separate pass reads it back and writes GELU of it. In the
weight-keeping bf16 stack on vit_h that pass was 16.8 ms of a 227 ms batch of 16 at the memory bound
(reports/2026-11-22-h100-vit_h-tables-bs16-noise8, "Where the time goes"); with the epilogue the hidden activation
is written once, already activated. inductor keeps `aten._addmm_activation` as one extern call (it does not split
it into a GEMM and a pointwise kernel), so this holds under `compile` too.

The numbers: on CUDA the epilogue computes GELU's tanh approximation, at most 4.7e-4 from the erf GELU SAM trains
with (|x| <= 6, float64), a twentieth of a bf16 step at 1.0; on the CPU `_addmm_activation` computes the erf GELU.
The weights are the model's own (lin1 keeps its Parameters): it takes the encoder-Linear slot, since the weight
patches would hand the GEMM a quantized weight it cannot take (fp8_fused computes GELU in lin2's quantization).
"""

from __future__ import annotations

from types import MethodType

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.common import MLPBlock
from torch import nn

from samrepro.patch import Patch, PatchConfig, PatchError, Tolerance, Undo
from samrepro.patches._weights import WEIGHTS_SLOT
from samrepro.registry import register_patch


def mlp_forward(self: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    """Upstream `MLPBlock.forward` with lin1's bias and GELU in the GEMM's epilogue."""
    flat = x.reshape(-1, x.shape[-1])  # tokens, C
    hidden = torch._addmm_activation(self.lin1.bias, flat, self.lin1.weight.t(), use_gelu=True)  # tokens, 4C
    return self.lin2(hidden.view(*x.shape[:-1], -1))  # ..., C


def _fits(mlp: nn.Module) -> bool:
    """An upstream MLPBlock whose act is nn.GELU and whose lin1 has a bias (the epilogue adds one)."""
    return type(mlp) is MLPBlock and type(mlp.act) is nn.GELU and mlp.lin1.bias is not None


def _apply(sam: Sam, config: PatchConfig, undo: Undo) -> None:
    mlps = [block.mlp for block in sam.image_encoder.blocks]
    unfit = [i for i, mlp in enumerate(mlps) if not _fits(mlp)]
    if unfit:
        raise PatchError(f"gelu_epilogue: blocks {unfit} lack an MLPBlock with nn.GELU and a lin1 bias")
    for mlp in mlps:
        undo.setattr(mlp, "forward", MethodType(mlp_forward, mlp))


PATCH = register_patch(
    Patch(
        name="gelu_epilogue",
        summary="encoder MLP's lin1 bias and GELU in the GEMM's epilogue (cuBLASLt): no separate GELU pass",
        config_cls=PatchConfig,
        apply_fn=_apply,
        # The tanh approximation's error is far below the bf16 rounding the stack already has: with it emulated in
        # fp32, embedding SQNR 78 dB on the trained tiny model (tests/test_gelu_epilogue.py) and 84 dB on vit_b
        # with seeded random weights (one 1024² noise image). On the CPU the patch is bit-exact.
        tolerance=Tolerance(
            agreement_miou_min=0.99, gt_miou_drop_max=0.005, embedding_sqnr_min_db=60.0, iou_pred_max_abs=0.005
        ),
        slots=(WEIGHTS_SLOT,),
    )
)
