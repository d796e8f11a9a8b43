"""channels_last: the image encoder's convolutions in NHWC (weights and inputs), so cuDNN takes its tensor-core kernels.

Found in the H100 profile of the blog plan (reports/2026-11-21-h100-attention-sweep-profiled-waterfalls): vit_b's
3x3 neck conv (B, 256, 64, 64) in bf16 ran cuDNN's legacy `implicit_convolve_sgemm`, 4.1 ms of a 62 ms bs16
encoder, eager and compiled alike, with its weight in NCHW (which layout its input had was not recorded). Same
math, other kernels: results change by summation order only. Undo restores the weight Parameters and the
convolutions' forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
from segment_anything.modeling import Sam
from torch import nn

from samrepro.patch import REORDERED, Patch, PatchConfig, Undo
from samrepro.registry import register_patch


@dataclass(frozen=True)
class ChannelsLastConfig(PatchConfig):
    pass


def conv_nhwc(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d's forward on the input made NHWC-contiguous (a no-op when it already is)."""
    return self._conv_forward(x.contiguous(memory_format=torch.channels_last), self.weight, self.bias)


def _apply(sam: Sam, config: ChannelsLastConfig, undo: Undo) -> None:
    for conv in (m for m in sam.image_encoder.modules() if isinstance(m, nn.Conv2d)):
        nhwc = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last), requires_grad=False)
        undo.setattr(conv, "weight", nhwc)  # out, in, kh, kw with NHWC strides
        undo.setattr(conv, "forward", MethodType(conv_nhwc, conv))


PATCH = register_patch(
    Patch(
        name="channels_last",
        summary="image-encoder convolutions with NHWC weights and inputs (cuDNN tensor-core kernels)",
        config_cls=ChannelsLastConfig,
        apply_fn=_apply,
        # Summation order only. Measured on the random tiny (fp32, CPU, torch 2.11, oneDNN, 2 images): embedding
        # SQNR 123.7 dB; tests/test_channels_last.py asserts >= 100 dB.
        tolerance=REORDERED,
    )
)
