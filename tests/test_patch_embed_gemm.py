"""patch_embed_gemm: the patch embedding as one GEMM gives upstream's tokens up to summation order, drops what the
convolution drops, traces as one graph, undoes exactly, and refuses a convolution that is not one."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import PatchEmbed

from samrepro.metrics import sqnr_db
from samrepro.patch import PatchError
from samrepro.registry import apply_patches

X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # preprocessed tiny input


@pytest.mark.parametrize("stack", [["patch_embed_gemm"], ["channels_last", "patch_embed_gemm"]])
def test_embeddings_match_upstream_and_undo_exactly(fp32_model, stack):
    sam = copy.deepcopy(fp32_model)
    embed = sam.image_encoder.patch_embed
    with torch.no_grad():
        ref, tokens = sam.image_encoder(X), embed(X)
        with apply_patches(sam, stack):
            out, gemm_tokens = sam.image_encoder(X), embed(X)
        assert "forward" not in vars(embed)  # upstream's forward is back
        assert torch.equal(sam.image_encoder(X), ref)
    assert gemm_tokens.shape == tokens.shape and gemm_tokens.is_contiguous()  # B, H/16, W/16, C
    assert sqnr_db(tokens, gemm_tokens) >= 100.0 and sqnr_db(ref, out) >= 100.0


def test_a_remainder_of_rows_and_columns_is_dropped_as_the_convolution_drops_it():
    embed = PatchEmbed(kernel_size=(8, 8), stride=(8, 8), in_chans=3, embed_dim=24)
    x = torch.randn(2, 3, 37, 29, generator=torch.Generator().manual_seed(1))  # 4 x 3 patches and a remainder
    with torch.no_grad():
        ref = embed(x)
        with apply_patches_to_embed(embed):
            out = embed(x)
    assert out.shape == ref.shape == (2, 4, 3, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_the_patched_embedding_traces_as_one_graph(fp32_model):
    sam = copy.deepcopy(fp32_model)
    with torch.no_grad(), apply_patches(sam, ["patch_embed_gemm"]):
        embed = sam.image_encoder.patch_embed
        compiled = torch.compile(embed, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(X), embed(X), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("conv_args", [{"stride": (8, 8)}, {"padding": (1, 1)}], ids=["overlapping patches", "padded"])
def test_refuses_a_convolution_that_is_not_one_gemm_over_patches(fp32_model, conv_args):
    sam = copy.deepcopy(fp32_model)
    proj = sam.image_encoder.patch_embed.proj
    sam.image_encoder.patch_embed.proj = torch.nn.Conv2d(3, proj.out_channels, proj.kernel_size, **conv_args)
    with pytest.raises(PatchError, match="patch_embed_gemm: the encoder's patch_embed is not upstream's PatchEmbed"):
        apply_patches(sam, ["patch_embed_gemm"])


def apply_patches_to_embed(embed: PatchEmbed):
    """The patch on a lone PatchEmbed: a stand-in model whose encoder holds it."""
    holder = torch.nn.Module()
    holder.image_encoder = torch.nn.Module()
    holder.image_encoder.patch_embed = embed
    return apply_patches(holder, ["patch_embed_gemm"])
