"""gelu_epilogue: bit-exact on the CPU, undone exactly, kept as one GEMM call by inductor, refused where it does not
fit; the tanh approximation the CUDA epilogue computes stays inside the declared tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn
from torch._inductor.utils import run_and_get_code

from samrepro.metrics import sqnr_db
from samrepro.patch import PatchError
from samrepro.patches.gelu_epilogue import mlp_forward
from samrepro.registry import apply_patches, get_patch

X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # preprocessed tiny input


def test_cpu_encoder_is_bit_exact_and_undone(fp32_model):
    """On the CPU `_addmm_activation` computes addmm then the erf GELU, as upstream: the same bits."""
    sam = copy.deepcopy(fp32_model)
    with torch.no_grad():
        ref = sam.image_encoder(X)
        with apply_patches(sam, ["gelu_epilogue"]):
            assert all("forward" in vars(block.mlp) for block in sam.image_encoder.blocks)
            out = sam.image_encoder(X)
        assert not any("forward" in vars(block.mlp) for block in sam.image_encoder.blocks)
        assert torch.equal(sam.image_encoder(X), ref)
    assert torch.equal(out, ref)


def test_tanh_approximation_is_inside_the_declared_tolerance(tiny_ref):
    """The CUDA epilogue's GELU is the tanh approximation; emulated in fp32 on the trained tiny model it costs less
    embedding SQNR than the patch declares, with the margin its comment states (78 dB against 60)."""
    sam, x = copy.deepcopy(tiny_ref), X.to(tiny_ref.device)
    with torch.no_grad():
        ref = sam.image_encoder(x)
        for block in sam.image_encoder.blocks:
            block.mlp.act = nn.GELU(approximate="tanh")
        approx = sam.image_encoder(x)
    assert sqnr_db(ref, approx) >= get_patch("gelu_epilogue").tolerance.embedding_sqnr_min_db + 15.0


def test_inductor_keeps_one_gemm_call():
    """Compiled, the MLP is one `_addmm_activation` call and lin2: no pointwise GELU kernel of its own."""
    mlp = MLPBlock(32, 128).eval()
    x = torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        ref = mlp(x)
        out, (code,) = run_and_get_code(torch.compile(mlp_forward), mlp, x)
    assert "aten._addmm_activation.default" in code and "use_gelu=True" in code
    assert "erf(" not in code and "tanh(" not in code  # no GELU kernel beside it
    torch.testing.assert_close(out, ref)


def test_refuses_mlps_it_cannot_fuse(fp32_model):
    sam = copy.deepcopy(fp32_model)
    sam.image_encoder.blocks[1].mlp.act = nn.ReLU()
    with pytest.raises(PatchError, match=r"gelu_epilogue: blocks \[1\] lack an MLPBlock with nn.GELU"):
        apply_patches(sam, ["gelu_epilogue"])
    assert not any("forward" in vars(block.mlp) for block in sam.image_encoder.blocks)


def test_takes_the_encoder_linear_slot(fp32_model):
    """A weight patch would hand the fused GEMM a quantized weight: the two cannot be stacked."""
    sam = copy.deepcopy(fp32_model)
    with apply_patches(sam, ["gelu_epilogue"]):
        with pytest.raises(PatchError, match="int8_dynamic cannot be stacked on gelu_epilogue"):
            apply_patches(sam, ["int8_dynamic"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt epilogue needs a GPU")
def test_cuda_epilogue_matches_tanh_gelu():
    """bf16 at vit_b's MLP width: the epilogue against addmm and a tanh GELU in fp32, within bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    mlp = MLPBlock(768, 3072).eval().to("cuda", torch.bfloat16)
    x = torch.randn(4, 64, 64, 768, generator=gen).to("cuda", torch.bfloat16)
    with torch.no_grad():
        hidden = nn.functional.linear(x.float(), mlp.lin1.weight.float(), mlp.lin1.bias.float())
        ref = mlp.lin2(nn.functional.gelu(hidden, approximate="tanh").to(torch.bfloat16))
        out = mlp_forward(mlp, x)
    assert sqnr_db(ref.float(), out.float()) >= 35.0
