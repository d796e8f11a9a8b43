"""fp8: torchao float8 (e4m3) dynamic-activation, float8-weight quantization of the encoder Linears with row-wise
scales (the Hopper alternative to int8; not a SAF step).

Weights get one scale per output channel, activations one per token at each call; the matmul is `torch._scaled_mm`
(sm89+; A100 cannot run it). torchao's row-wise path takes bf16 weights only: in an fp32 model each quantized
Linear holds bf16 weights and bias and casts its input to bf16 and its output back. Undo as for int8_dynamic:
the original Parameters, the instance `extra_repr` and the fp32 layers' `forward` come back.
"""

from __future__ import annotations

from types import MethodType

import torch
from segment_anything.modeling import Sam
from torch import nn

from samrepro.patch import Patch, PatchError, Requires, Undo
from samrepro.patches._float8 import TOLERANCE, Fp8Config
from samrepro.patches._host import park_on_host
from samrepro.patches._weights import WEIGHTS_SLOT, encoder_linears, quantize_reversibly, require_multiples
from samrepro.registry import register_patch

WEIGHT_DTYPE = torch.bfloat16  # what torchao 0.18's PerRow float8 accepts


def _bf16_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return type(self).forward(self, x.to(WEIGHT_DTYPE)).to(x.dtype)  # ..., out


def hold_bf16(linear: nn.Linear, undo: Undo) -> None:
    """Give an fp32 Linear bf16 weight and bias, computing in bf16 and returning its input's dtype;
    the fp32 originals wait on the host."""
    originals = list(linear.parameters(recurse=False))
    for name, p in linear.named_parameters(recurse=False):
        undo.setattr(linear, name, nn.Parameter(p.detach().to(WEIGHT_DTYPE), requires_grad=False))
    undo.setattr(linear, "forward", MethodType(_bf16_forward, linear))
    park_on_host(originals, undo)


def _apply(sam: Sam, config: Fp8Config, undo: Undo) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8MMConfig, PerRow

    linears = encoder_linears(sam)
    require_multiples(linears, 16, "fp8", "torch._scaled_mm")  # torchao leaves other layers unquantized silently
    for linear in linears.values():
        if linear.weight.dtype == torch.float32:
            hold_bf16(linear, undo)
        elif linear.weight.dtype != WEIGHT_DTYPE:
            raise PatchError(f"fp8: row-wise float8 takes fp32 or bf16 weights, got {linear.weight.dtype}")
    ao_config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(),
        mm_config=Float8MMConfig(use_fast_accum=config.fast_accum),
        activation_value_lb=config.activation_value_lb,
        set_inductor_config=False,
    )
    quantize_reversibly(linears, ao_config, "fp8", undo)


PATCH = register_patch(
    Patch(
        name="fp8",
        summary="encoder Linears as torchao float8 row-wise dynamic-activation x weight matmuls (weights change)",
        config_cls=Fp8Config,
        apply_fn=_apply,
        tolerance=TOLERANCE,
        requires=Requires(devices=("cuda",), min_capability=(8, 9), packages=("torchao",)),
        changes_weights=True,
        slots=(WEIGHTS_SLOT,),
    )
)
