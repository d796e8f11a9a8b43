"""Microbenchmarks on a GPU at SAM's own shapes: vit_b (12 heads of dim 64) and vit_h (16 heads of dim 80) at 1024 px,
batch 16, in bf16 (the `bf16` patch, the first step of every GPU plan), with random weights: the encoder attention of
a windowed block (25 padded 14x14 windows per image) and of a global block (the 64x64 grid), each whole block, and a
block's MLP, each unpatched and under every registered patch that changes it and can run on this GPU; and a windowed
block under triton_attn in both window modes. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from benchmarks.micro.inputs import attention_input, encoder_tokens
from benchmarks.micro.variants import (
    BLOCK_KINDS,
    UPSTREAM,
    block_of_kind,
    encoder_attention_patches,
    linear_weight_patches,
    patched,
)

import samrepro

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
BATCH = 16  # images per encoder call, as the reference runs
MODELS = ("vit_b", "vit_h")

ATTENTION = [(kind, v) for kind in BLOCK_KINDS for v in (UPSTREAM, *encoder_attention_patches(DEVICE, kind))]
# A whole block: triton_attn's windowed blocks skip the window partition, which only the block's own forward shows.
BLOCK = [(kind, v) for kind in BLOCK_KINDS for v in dict.fromkeys(
    [UPSTREAM, *encoder_attention_patches(DEVICE, kind), *linear_weight_patches(DEVICE)]
)]  # fmt: skip


@pytest.fixture(scope="module", params=MODELS)
def sam_bf16(request):
    """The model in bf16 for the module's tests of one architecture; the next architecture loads after it is freed."""
    sam = samrepro.load_model(request.param, DEVICE, weights="random")
    with samrepro.apply_patches(sam, ["bf16"]):
        yield sam
    del sam
    torch.cuda.empty_cache()


@pytest.mark.parametrize("case", BLOCK, ids="-".join)
def test_encoder_block(sam_bf16, measure, case):
    """One image-encoder block over 16 x 64 x 64 tokens: norms, (windowed) attention, MLP, residuals."""
    kind, variant = case
    block = block_of_kind(sam_bf16.image_encoder, kind)
    x = encoder_tokens(sam_bf16.image_encoder, BATCH)  # 16, 64, 64, C
    with patched(sam_bf16, variant):
        measure(lambda: block(x), DEVICE)


@pytest.mark.parametrize("image_windows", [True, False], ids=["image_windows", "partitioned"])
def test_windowed_block_triton_attn(sam_bf16, measure, image_windows):
    """A windowed block under triton_attn, its kernel reading the windows from the image in place or, as upstream
    partitions them, from padded windows: what the window mode costs or saves, side by side."""
    block = block_of_kind(sam_bf16.image_encoder, "windowed")
    x = encoder_tokens(sam_bf16.image_encoder, BATCH)  # 16, 64, 64, C
    with samrepro.apply_patches(sam_bf16, ["triton_attn"], {"triton_attn": {"image_windows": image_windows}}):
        measure(lambda: block(x), DEVICE)


@pytest.mark.parametrize("case", ATTENTION, ids="-".join)
def test_encoder_attention(sam_bf16, measure, case):
    """The attention of one block (qkv, rel-pos terms, softmax attention, projection), upstream or as a patch
    rewrites it (triton_attn: samrepro's fused kernel)."""
    kind, variant = case
    block = block_of_kind(sam_bf16.image_encoder, kind)
    x = attention_input(block, encoder_tokens(sam_bf16.image_encoder, BATCH))  # 400, 14, 14, C | 16, 64, 64, C
    with patched(sam_bf16, variant):
        measure(lambda: block.attn(x), DEVICE)


@pytest.mark.parametrize("variant", [UPSTREAM, *linear_weight_patches(DEVICE)])
def test_encoder_mlp(sam_bf16, measure, variant):
    """norm2 and the MLP of one block over 16 x 64 x 64 tokens: the Linears the weight patches replace (int8_dynamic,
    fp8, fp8_fused with its GELU and LayerNorm fused in, sparse24) and gelu_epilogue (lin1 and GELU in one GEMM)."""
    block = sam_bf16.image_encoder.blocks[0]
    x = encoder_tokens(sam_bf16.image_encoder, BATCH)  # 16, 64, 64, C
    with patched(sam_bf16, variant):
        measure(lambda: block.mlp(block.norm2(x)), DEVICE)  # looked up per call: a patch may swap the modules
