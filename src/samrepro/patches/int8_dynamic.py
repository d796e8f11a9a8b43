"""int8_dynamic: torchao int8 dynamic-activation, int8-weight quantization of the encoder Linears (SAF step 8).

Every nn.Linear of the image encoder (qkv, proj, lin1, lin2 of each block) gets an `Int8Tensor` weight: int8 per
output channel, symmetric; activations are quantized per token at each call and multiplied in int8 (`torch._int_mm`
through torchao's `int_scaled_matmul`), the int32 result rescaled to the activation dtype. Works on fp32 and bf16
models, CPU and CUDA. torchao has no undo and sets inductor flags globally by default: the patch keeps the weight
Parameters and the instance `extra_repr` torchao rebinds, passes `set_inductor_config=False`, and asks `compile` to
hold its one knob (`force_fuse_int_mm_with_mul`) inside the compiled encoder's calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from segment_anything.modeling import Sam

from samrepro.patch import Patch, PatchConfig, Requires, Tolerance, Undo
from samrepro.patches._knobs import request_knobs
from samrepro.patches._weights import WEIGHTS_SLOT, encoder_linears, quantize_reversibly, require_multiples
from samrepro.registry import register_patch


@dataclass(frozen=True)
class Int8DynamicConfig(PatchConfig):
    """fuse_int_mm_with_mul: under `compile`, inductor fuses the per-token scale multiply into the int_mm
    epilogue, so the int32 product is never written out (SAF's one int8 knob; torchao tutorial: vit_h block
    19.04 -> 18.78 ms, peak 3.58 -> 2.37 GB)."""

    fuse_int_mm_with_mul: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fuse_int_mm_with_mul, bool):
            raise ValueError(f"fuse_int_mm_with_mul must be a bool, got {self.fuse_int_mm_with_mul!r}")


def _apply(sam: Sam, config: Int8DynamicConfig, undo: Undo) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    linears = encoder_linears(sam)
    # else torchao's `safe_int_mm` quietly moves the CUDA matmul to the CPU in int32
    require_multiples(linears, 8, "int8_dynamic", "torch._int_mm")
    ao_config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)  # defaults: PerRow, symmetric
    quantize_reversibly(linears, ao_config, "int8_dynamic", undo)
    if config.fuse_int_mm_with_mul:
        request_knobs(sam.image_encoder, {"force_fuse_int_mm_with_mul": True}, undo)


# Measured against the fp32 model with the same weights, default config (CPU, torch 2.11, torchao 0.18):
# trained tiny (shipped weights), fixed validation subset (48 synthetic val images, 254 center-point prompts,
#   batches of 8): agreement 0.9945, GT-mIoU drop 0.0013, SQNR 48.0 dB, |d iou_pred| <= 0.0104; 240 random gate
#   batches (1-3 images, 1-4 prompts): SQNR >= 43.0 dB, |d iou_pred| <= 0.0131. Stacked on bf16: agreement 0.9926,
#   SQNR 43.5 dB. Random-weight tiny: agreement 0.975, SQNR 38.6 dB (>= 35.7 over 20 gate batches), |d iou| 0.015.
# Not measured on CUDA: integer matmuls are exact there too, but float noise flips some activations' int8 rounding
# (on CPU a 1e-6 input perturbation moves the random tiny's embedding by 0.25%, int8's own error there being 0.4%).
# Published (SAF, COCO, bs8): mIoU -0.0008 (vit_b) / +0.0015 (vit_h) against the step before. Bounds: the random-weight
# worst case less ~3.5 dB (35.7 -> 32) and 0.025 agreement, so deeper encoders have room (to be confirmed on vit_b by
# the first GPU run); the trained tiny sits far above them.
TOLERANCE = Tolerance(agreement_miou_min=0.95, gt_miou_drop_max=0.02, embedding_sqnr_min_db=32.0, iou_pred_max_abs=0.04)

PATCH = register_patch(
    Patch(
        name="int8_dynamic",
        summary="encoder Linears as torchao int8 dynamic-activation x int8-weight matmuls (weights change)",
        config_cls=Int8DynamicConfig,
        apply_fn=_apply,
        tolerance=TOLERANCE,
        requires=Requires(packages=("torchao",)),
        changes_weights=True,
        slots=(WEIGHTS_SLOT,),
    )
)
