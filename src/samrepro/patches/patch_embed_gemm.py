"""patch_embed_gemm: the image encoder's patch embedding (a convolution whose stride is its kernel) as one GEMM over
the image's patches, beyond the blog.

A 16x16 convolution with stride 16 is a GEMM: each 16x16 patch of the (B, 3, H, W) image, flattened, times the
(C, 3 * 16 * 16) weight. cuDNN runs it as a general convolution: in the H100 profiles of both stacks it took one
Ampere-style kernel (`cutlass_tensorop_bf16_s16816fprop`) 2.27 ms per vit_b batch of 16 and 3.74 ms per vit_h batch,
≈ 34 TFLOP/s (reports/2026-12-07-h100-vit_b-stacks-profile-fp8-one-read). As a GEMM it is one copy that gathers the
patches and one cuBLAS call, whose output is already the (B, H/16, W/16, C) tokens upstream gets by permuting the
convolution's output. Same products, summed in another order; the weights are the model's own, reshaped per call
(a view of an NCHW weight; a small copy of channels_last's NHWC one).
"""

from __future__ import annotations

from types import MethodType

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import nn

from samrepro.patch import REORDERED, Patch, PatchConfig, PatchError, Undo
from samrepro.registry import register_patch


def patch_embed_forward(self: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """Upstream `PatchEmbed.forward`, (B, c, H, W) -> (B, H // kh, W // kw, C), as one GEMM over the patches."""
    conv = self.proj
    (kh, kw), (b, c, h, w) = conv.kernel_size, x.shape
    gh, gw = h // kh, w // kw  # the convolution drops a remainder of rows or columns too
    grid = x[:, :, : gh * kh, : gw * kw].reshape(b, c, gh, kh, gw, kw)  # B, c, gh, kh, gw, kw
    flat = grid.permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * kh * kw)  # one copy: B * gh * gw, c * kh * kw
    weight = conv.weight.reshape(conv.out_channels, c * kh * kw)  # C, c * kh * kw in the patches' order
    out = flat @ weight.t() if conv.bias is None else torch.addmm(conv.bias, flat, weight.t())  # B * gh * gw, C
    return out.view(b, gh, gw, conv.out_channels)  # B, gh, gw, C


def _fits(embed: nn.Module) -> bool:
    """Upstream's PatchEmbed over a plain convolution that reads each input pixel once (stride = kernel)."""
    conv = getattr(embed, "proj", None)
    return (
        type(embed) is PatchEmbed
        and type(conv) is nn.Conv2d
        and conv.stride == conv.kernel_size
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _apply(sam: Sam, config: PatchConfig, undo: Undo) -> None:
    embed = sam.image_encoder.patch_embed
    if not _fits(embed):
        raise PatchError(
            "patch_embed_gemm: the encoder's patch_embed is not upstream's PatchEmbed over an unpadded, ungrouped "
            f"Conv2d whose stride is its kernel: {embed!r}"
        )
    undo.setattr(embed, "forward", MethodType(patch_embed_forward, embed))


PATCH = register_patch(
    Patch(
        name="patch_embed_gemm",
        summary="image-encoder patch embedding (a convolution with stride = kernel) as one GEMM over the patches",
        config_cls=PatchConfig,
        apply_fn=_apply,
        # Summation order only: tests/test_patch_embed_gemm.py asserts >= 100 dB embedding SQNR on the tiny (fp32).
        tolerance=REORDERED,
    )
)
