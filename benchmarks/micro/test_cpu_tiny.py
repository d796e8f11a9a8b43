"""Microbenchmarks on the CPU: parts of the embedded tiny model (fp32, batch 8 at 256 px, as `nox -s ablate`'s CPU
plan runs it), unpatched and under each registered patch that changes the part and can run here."""

from __future__ import annotations

import pytest
import torch
from benchmarks.micro.inputs import attention_input, encoder_tokens
from benchmarks.micro.variants import (
    BLOCK_KINDS,
    UPSTREAM,
    block_of_kind,
    decoder_attention_patches,
    encoder_attention_patches,
    linear_weight_patches,
    patched,
)

import samrepro

DEVICE = "cpu"
BATCH = 8  # images per encoder call
PROMPTS = 8  # point prompts per decoder call, as the noise:8 workload

ATTENTION = [(kind, v) for kind in BLOCK_KINDS for v in (UPSTREAM, *encoder_attention_patches(DEVICE, kind))]
# A whole block changes under any patch that changes its attention or its Linear weights.
BLOCK = [(kind, v) for kind in BLOCK_KINDS for v in dict.fromkeys(
    [UPSTREAM, *encoder_attention_patches(DEVICE, kind), *linear_weight_patches(DEVICE)]
)]  # fmt: skip


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def tiny():
    return samrepro.load_model("tiny", DEVICE)


@pytest.mark.parametrize("case", BLOCK, ids=case_id)
def test_encoder_block(tiny, measure, case):
    """One image-encoder block: norm, (windowed) attention with the rel-pos bias, MLP."""
    kind, variant = case
    block = block_of_kind(tiny.image_encoder, kind)
    x = encoder_tokens(tiny.image_encoder, BATCH)  # 8, 16, 16, 128
    with patched(tiny, variant):
        measure(lambda: block(x), DEVICE)


@pytest.mark.parametrize("case", ATTENTION, ids=case_id)
def test_encoder_attention(tiny, measure, case):
    """The attention of one block (qkv, rel-pos terms, softmax attention, projection), upstream or as a patch
    rewrites it; windowed: 9 padded 6x6 windows per image, global: the 16x16 grid."""
    kind, variant = case
    block = block_of_kind(tiny.image_encoder, kind)
    x = attention_input(block, encoder_tokens(tiny.image_encoder, BATCH))  # 72, 6, 6, 128 | 8, 16, 16, 128
    with patched(tiny, variant):
        measure(lambda: block.attn(x), DEVICE)


@pytest.mark.parametrize("variant", [UPSTREAM, *linear_weight_patches(DEVICE)])
def test_encoder_mlp(tiny, measure, variant):
    """norm2 and the MLP of one block (lin1, GELU, lin2): the Linears the weight patches replace, such as
    int8_dynamic's torchao int8 dynamic-activation matmuls."""
    block = tiny.image_encoder.blocks[0]
    x = encoder_tokens(tiny.image_encoder, BATCH)  # 8, 16, 16, 128
    with patched(tiny, variant):
        measure(lambda: block.mlp(block.norm2(x)), DEVICE)  # looked up per call: a patch may swap the modules


@pytest.mark.parametrize("variant", [UPSTREAM, *decoder_attention_patches(DEVICE)])
def test_mask_decoder(tiny, measure, variant):
    """One mask-decoder call for one image and its point prompts, three masks each, as SamPredictor makes it."""
    gen = torch.Generator().manual_seed(0)
    side = tiny.image_encoder.img_size
    points = torch.rand(PROMPTS, 1, 2, generator=gen) * side  # P, 1, 2 (x, y in input pixels)
    labels = torch.ones(PROMPTS, 1, dtype=torch.int64)  # P, 1: foreground
    embedding_side = tiny.prompt_encoder.image_embedding_size
    embeddings = torch.randn(1, tiny.prompt_encoder.embed_dim, *embedding_side, generator=gen)  # 1, 128, 16, 16
    with torch.inference_mode():
        sparse, dense = tiny.prompt_encoder(points=(points, labels), boxes=None, masks=None)  # P, 2, C; P, C, 16, 16
        image_pe = tiny.prompt_encoder.get_dense_pe()  # 1, 128, 16, 16
    with patched(tiny, variant):
        measure(lambda: tiny.mask_decoder(embeddings, image_pe, sparse, dense, multimask_output=True), DEVICE)
