"""int8_dynamic: which weights become int8, exact undo, no global inductor flags, its knob inside compile's calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.compile_fx
import torch._inductor.config as inductor_config
from torch import nn
from torchao.quantization import Int8Tensor

from samrepro.kernels import COUNTERS
from samrepro.patch import PatchError
from samrepro.patches.compile import CompileConfig
from samrepro.patches.int8_dynamic import Int8DynamicConfig
from samrepro.registry import apply_patches, get_patch
from samrepro.snapshot import global_state, model_state, tensors_equal

PATCH = get_patch("int8_dynamic")
X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # preprocessed tiny input


def linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def untouched(sam: nn.Module) -> list[torch.Tensor]:
    """Parameters no weight patch may replace: the encoder's convs and every mask decoder Linear."""
    enc = sam.image_encoder
    return [*enc.patch_embed.parameters(), *enc.neck.parameters(), *sam.mask_decoder.parameters()]


@pytest.fixture
def spy_compiler(monkeypatch):
    """inductor's compile_fx replaced by a spy that records the knob and returns the graph uncompiled."""
    seen: list[bool] = []

    def spy(gm, example_inputs, **kwargs):
        seen.append(inductor_config.force_fuse_int_mm_with_mul)
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", spy)
    yield seen
    torch._dynamo.reset()


def test_encoder_linears_become_int8_and_nothing_else(sam):
    kept = untouched(sam)
    before, layers = global_state(), COUNTERS.get("int8_dynamic.layers", 0)
    PATCH.apply(sam)
    encoder = linears(sam.image_encoder)
    assert len(encoder) == 24  # qkv, proj, lin1, lin2 of 6 blocks
    for m in encoder.values():
        assert type(m.weight) is Int8Tensor and m.weight.qdata.dtype == torch.int8
        assert m.bias.dtype == torch.float32  # bias stays float
    assert all(a is b for a, b in zip(untouched(sam), kept, strict=True))
    assert COUNTERS["int8_dynamic.layers"] == layers + 24
    assert global_state() == before  # set_inductor_config=False: no flag set globally


def test_quantized_linear_is_close_but_not_equal(sam):
    lin = sam.image_encoder.blocks[0].mlp.lin1
    x = torch.randn(2, 16, 16, lin.in_features)
    ref = lin(x)
    with PATCH.apply(sam):
        out = lin(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel  # per-token x per-channel int8: ~1% error, never exact


def test_undo_restores_parameter_objects_and_extra_repr(sam):
    twin, state = copy.deepcopy(sam), model_state(sam)
    weights = {n: m.weight for n, m in linears(sam.image_encoder).items()}
    with torch.no_grad():
        ref = sam.image_encoder(X)
    handle = PATCH.apply(sam)
    assert all("extra_repr" in vars(m) for m in linears(sam.image_encoder).values())  # torchao rebinds it
    handle.undo()
    assert all(m.weight is weights[n] for n, m in linears(sam.image_encoder).items())
    assert not any("extra_repr" in vars(m) for m in linears(sam.image_encoder).values())
    assert model_state(sam) == state and tensors_equal(sam, twin) == []
    with torch.no_grad():
        assert torch.equal(sam.image_encoder(X), ref)


@pytest.mark.parametrize("fuse", [True, False])
def test_fusion_knob_holds_inside_compiled_calls_only(sam, spy_compiler, fuse):
    assert inductor_config.force_fuse_int_mm_with_mul is False
    configs = {"int8_dynamic": Int8DynamicConfig(fuse_int_mm_with_mul=fuse), "compile": CompileConfig(mode="default")}
    with apply_patches(sam, ["int8_dynamic", "compile"], configs):
        with torch.no_grad():
            sam.image_encoder(X)
        assert inductor_config.force_fuse_int_mm_with_mul is False
    assert spy_compiler == [fuse]
    with apply_patches(sam, ["compile"], {"compile": CompileConfig(mode="default")}):  # int8 undone: knob gone
        with torch.no_grad():
            sam.image_encoder(X)
    assert spy_compiler == [fuse, False]


def test_compile_config_contradicting_the_knob_is_refused(sam):
    state = model_state(sam)
    against = CompileConfig(mode="default", inductor_options={"force_fuse_int_mm_with_mul": False})
    with pytest.raises(PatchError, match="force_fuse_int_mm_with_mul"):
        apply_patches(sam, ["int8_dynamic", "compile"], {"compile": against})
    assert model_state(sam) == state  # apply_patches undid int8 too


def test_config_round_trip_and_validation():
    cfg = Int8DynamicConfig(fuse_int_mm_with_mul=False)
    assert Int8DynamicConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="must be a bool"):
        Int8DynamicConfig(fuse_int_mm_with_mul="yes")
    assert PATCH.changes_weights


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int8_matches_cpu_int8(fp32_model):
    """Integer matmuls are exact; what differs is where float noise flips an activation's int8 rounding
    (on CPU a 1e-6 relative input perturbation moves this output by 0.25%; int8's own error here is 0.4%)."""
    cpu, gpu = copy.deepcopy(fp32_model), copy.deepcopy(fp32_model).cuda()
    with PATCH.apply(cpu), PATCH.apply(gpu), torch.no_grad():
        a, b = cpu.image_encoder(X), gpu.image_encoder(X.cuda()).cpu()
    assert ((a - b).norm() / a.norm()).item() < 0.01


@pytest.mark.parametrize("name, multiple", [("int8_dynamic", 8), ("fp8", 16)])
def test_linears_of_unfit_dims_are_refused_not_skipped(name, multiple):
    """torchao would leave such a layer unquantized (or move int8's matmul to the CPU) without a word."""
    from types import SimpleNamespace

    from samrepro.patch import Undo

    patch = get_patch(name)
    encoder = nn.Sequential(nn.Linear(multiple, multiple), nn.Linear(multiple, multiple + 4))
    with pytest.raises(PatchError, match=rf"multiples of {multiple} .*\['1 \({multiple + 4}, {multiple}\)'\]"):
        patch.apply_fn(SimpleNamespace(image_encoder=encoder), patch.config_cls(), Undo())
