"""fp8: skipped with a reason off sm89+, its fp32 adapter, config round trip; the float8 path itself on sm89+ only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization import Float8Tensor

from samrepro.kernels import COUNTERS
from samrepro.patch import PatchError, PatchUnavailable, Undo
from samrepro.patches.fp8 import Fp8Config, hold_bf16
from samrepro.registry import apply_patches, get_patch
from samrepro.snapshot import model_state, tensors_equal

PATCH = get_patch("fp8")
SM89 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # preprocessed tiny input


def test_needs_cuda_sm89_and_says_so(sam):
    assert PATCH.requires.min_capability == (8, 9) and PATCH.requires.devices == ("cuda",)
    assert PATCH.unavailable_reason("cpu") == "needs device cuda, got cpu"
    state = model_state(sam)
    with pytest.raises(PatchUnavailable, match="fp8: needs device cuda"):
        PATCH.apply(sam)
    assert model_state(sam) == state


@pytest.mark.skipif(not torch.cuda.is_available() or SM89, reason="needs a GPU older than sm89")
def test_older_gpu_reason():
    assert "needs compute capability >= 8.9" in PATCH.unavailable_reason("cuda")


def test_hold_bf16_keeps_the_fp32_interface_and_undoes_exactly():
    lin = nn.Linear(64, 32)
    weight, bias, x = lin.weight, lin.bias, torch.randn(2, 5, 64)
    ref, undo = lin(x), Undo()
    hold_bf16(lin, undo)
    assert lin.weight.dtype == lin.bias.dtype == torch.bfloat16
    out = lin(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=0.05) and not torch.equal(out, ref)
    undo.run()
    assert lin.weight is weight and lin.bias is bias and "forward" not in vars(lin)
    assert torch.equal(lin(x), ref)


def test_config_round_trip_and_validation():
    cfg = Fp8Config(fast_accum=False)
    assert Fp8Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="must be a bool"):
        Fp8Config(fast_accum=1)
    with pytest.raises(ValueError, match="positive float"):
        Fp8Config(activation_value_lb=0.0)
    assert PATCH.changes_weights


@pytest.mark.cuda
@pytest.mark.skipif(not SM89, reason="needs CUDA sm89+")
@pytest.mark.parametrize("bf16", [False, True])
def test_float8_weights_and_exact_undo(fp32_model, bf16):
    sam = copy.deepcopy(fp32_model).cuda()
    state, layers = model_state(sam), COUNTERS.get("fp8.layers", 0)
    with torch.no_grad():
        ref = sam.image_encoder(X.cuda())
        with apply_patches(sam, ["bf16", "fp8"] if bf16 else ["fp8"]):
            linears = [m for m in sam.image_encoder.modules() if isinstance(m, nn.Linear)]
            assert all(type(m.weight) is Float8Tensor for m in linears)
            assert COUNTERS["fp8.layers"] == layers + 24
            out = sam.image_encoder(X.cuda())
            assert out.dtype == (torch.bfloat16 if bf16 else torch.float32) and torch.isfinite(out).all()
            slot = "both take the slot 'encoder linear weights'"
            with pytest.raises(PatchError, match=f"int8_dynamic cannot be stacked on fp8: {slot}"):
                get_patch("int8_dynamic").apply(sam)
        assert model_state(sam) == state and tensors_equal(sam, fp32_model) == []
        assert torch.equal(sam.image_encoder(X.cuda()), ref)


def test_zero_rows_quantize_to_zero_only_with_the_floor():
    """The H100 NaN: a zero activation row (SAM's window padding) gets scale 0 without a floor on max |x|."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    x = torch.randn(4, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[2] = 0  # a padded token
    for lb, nan_rows in ((None, [False, False, True, False]), (Fp8Config().activation_value_lb, [False] * 4)):
        scale = _choose_scale_float8(x, block_size=[1, 32], float8_dtype=torch.float8_e4m3fn, hp_value_lb=lb)
        q = _quantize_affine_float8(x, scale, torch.float8_e4m3fn).float()  # 4, 32
        assert torch.isnan(q).any(dim=1).tolist() == nan_rows
