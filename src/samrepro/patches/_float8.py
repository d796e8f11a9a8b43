"""The float8 scheme `fp8` and `fp8_fused` share (e4m3, one scale per token and per output channel): its config
and its declared tolerance."""

from __future__ import annotations

from dataclasses import dataclass

from samrepro.patch import PatchConfig, Tolerance


@dataclass(frozen=True)
class Fp8Config(PatchConfig):
    """fast_accum: `_scaled_mm` accumulates in lower precision (torchao's default; faster, slightly less exact).
    activation_value_lb: floor of each activation row's max |x| when its scale is chosen. SAM pads windowed blocks
    with zero tokens; without a floor their rows get scale 0 and quantize to 0/0 = NaN, which the padded keys
    spread to every query of the window (H100, vit_b: NaN embeddings, agreement 0.002;
    reports/2026-11-21-h100-attention-sweep-profiled-waterfalls)."""

    fast_accum: bool = True
    activation_value_lb: float = 1e-12

    def __post_init__(self) -> None:
        if not isinstance(self.fast_accum, bool):
            raise ValueError(f"fast_accum must be a bool, got {self.fast_accum!r}")
        if not isinstance(self.activation_value_lb, float) or not self.activation_value_lb > 0:
            raise ValueError(f"activation_value_lb must be a positive float, got {self.activation_value_lb!r}")


# Set before any sm89+ run as int8_dynamic's bounds loosened for e4m3's 3 mantissa bits (on a random MLP:
# 5.3% rel. error vs int8's 1.7%, i.e. ~25 vs ~35 dB). First H100 measurement (2026-11-21, random
# weights, bs16, stacked on beyond.toml's compile_decoder step, against fp32): vit_b SQNR 36.2 dB, agreement
# 0.952 (0.959 without fp8); vit_h 32.5 dB, 0.964 (0.973). One run per model: the bounds keep their margin.
TOLERANCE = Tolerance(agreement_miou_min=0.90, gt_miou_drop_max=0.03, embedding_sqnr_min_db=22.0, iou_pred_max_abs=0.08)
