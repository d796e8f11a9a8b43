"""sparse24: the 2:4 pattern and magnitude rule, the kernel path per layer (counted), exact undo, exclusivity."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.sparse import SparseSemiStructuredTensor

import samrepro.patches.sparse24 as sparse24
from samrepro.data import load_dataset
from samrepro.gates import accuracy_violations, patches_for
from samrepro.kernels import COUNTERS
from samrepro.patch import PatchError, PatchUnavailable
from samrepro.patches._weights import encoder_linears
from samrepro.patches.sparse24 import Sparse24Config, choose_backend, prune_2_4
from samrepro.registry import apply_patches, get_patch
from samrepro.snapshot import global_state, model_state, tensors_equal

PATCH = get_patch("sparse24")
CUDA = torch.cuda.is_available()
CUSPARSELT = CUDA and torch.backends.cusparselt.is_available()
X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # preprocessed tiny input


def assert_2_4(pruned: torch.Tensor, dense: torch.Tensor) -> None:
    """`pruned` is `dense` with the 2 largest |w| (rounded to bf16) of every group of 4 input-dim weights kept, the
    rest zero."""
    p, d = pruned.reshape(pruned.shape[0], -1, 4), dense.reshape(dense.shape[0], -1, 4)  # out, in/4, 4
    kept = p != 0
    assert ((~kept).sum(-1) >= 2).all()  # every group of 4 has at least 2 zeros
    assert torch.equal(torch.where(kept, d, torch.zeros_like(d)), p)  # kept weights keep their values
    assert torch.equal(kept.sum(-1), (d != 0).sum(-1).clamp(max=2))  # no nonzero dropped beyond 2 per group
    mag = d.abs().to(torch.bfloat16)  # out, in/4, 4
    largest_dropped = torch.where(kept, torch.zeros_like(mag), mag).amax(-1)  # out, in/4
    smallest_kept = torch.where(kept, mag, torch.full_like(mag, torch.inf)).amin(-1)  # out, in/4
    assert (largest_dropped <= smallest_kept).all()


def test_prune_hand_example():
    w = torch.tensor([[9.0, 1.0, 7.0, 4.0, -5.0, 2.0, 0.1, -3.0]])
    assert torch.equal(prune_2_4(w), torch.tensor([[9.0, 0.0, 7.0, 0.0, -5.0, 0.0, 0.0, -3.0]]))


@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_prune_keeps_the_two_largest_of_every_four(rows, groups, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 4 * groups, generator=gen).to(dtype)
    w[torch.rand(w.shape, generator=gen) < 0.1] = 0  # some zeros and (in bf16) ties
    pruned = prune_2_4(w)
    assert pruned.dtype == dtype and pruned.shape == w.shape
    assert_2_4(pruned, w)


def test_prune_keeps_the_same_weights_in_fp32_and_after_bf16():
    # the reference run prunes fp32 weights, a stack with bf16 prunes them rounded: one mask for both
    w = torch.randn(768, 3072, generator=torch.Generator().manual_seed(0))  # vit_b's MLP shape
    assert torch.equal(prune_2_4(w) != 0, prune_2_4(w.to(torch.bfloat16)) != 0)


def test_cpu_default_prunes_every_encoder_linear_with_masked_weights(sam):
    dense = {n: m.weight.detach().clone() for n, m in encoder_linears(sam).items()}
    decoder = list(sam.mask_decoder.parameters())
    before, masked = global_state(), COUNTERS.get("sparse24.masked.layers", 0)
    PATCH.apply(sam)  # kernel="auto": on CPU no semi-structured backend, so masked throughout, and counted
    assert COUNTERS["sparse24.masked.layers"] == masked + len(dense) == masked + 24
    for name, m in encoder_linears(sam).items():
        assert type(m.weight) is nn.Parameter and m.weight.layout == torch.strided
        assert torch.equal(m.weight, prune_2_4(dense[name]))
        assert_2_4(m.weight.detach(), dense[name])
    assert all(a is b for a, b in zip(sam.mask_decoder.parameters(), decoder, strict=True))
    assert global_state() == before and SparseSemiStructuredTensor._FORCE_CUTLASS is False


def test_undo_restores_dense_parameter_objects(sam):
    twin, state = copy.deepcopy(sam), model_state(sam)
    weights = {n: m.weight for n, m in encoder_linears(sam).items()}
    with torch.no_grad():
        ref = sam.image_encoder(X)
        with PATCH.apply(sam, Sparse24Config(kernel="masked")):
            assert not torch.equal(sam.image_encoder(X), ref)
    assert all(m.weight is weights[n] for n, m in encoder_linears(sam).items())
    assert model_state(sam) == state and tensors_equal(sam, twin) == []
    with torch.no_grad():
        assert torch.equal(sam.image_encoder(X), ref)


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
def test_explicit_kernel_refused_on_cpu_with_reason(sam, kernel):
    state = model_state(sam)
    with pytest.raises(PatchUnavailable, match=f"kernel='{kernel}': {kernel} 2:4 kernels need CUDA"):
        PATCH.apply(sam, Sparse24Config(kernel=kernel))
    assert model_state(sam) == state
    assert choose_backend("auto", torch.device("cpu")) is None


def test_int8_and_sparse24_share_the_weights_slot(sam):
    state = model_state(sam)
    slot = "both take the slot 'encoder linear weights'"
    with pytest.raises(PatchError, match=f"sparse24 cannot be stacked on int8_dynamic: {slot}"):
        apply_patches(sam, ["sparse24", "int8_dynamic"])  # PATCH_ORDER applies int8_dynamic first
    assert model_state(sam) == state
    with PATCH.apply(sam):
        with pytest.raises(PatchError, match=f"int8_dynamic cannot be stacked on sparse24: {slot}"):
            get_patch("int8_dynamic").apply(sam)


def test_config_round_trip_and_validation():
    cfg = Sparse24Config(kernel="cutlass")
    assert Sparse24Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="kernel must be one of"):
        Sparse24Config(kernel="cublas")
    assert PATCH.changes_weights


@pytest.mark.cuda
@pytest.mark.skipif(not CUSPARSELT, reason="needs CUDA with cuSPARSELt")
def test_cuda_bf16_runs_on_cusparselt_and_matches_masked(fp32_model):
    """auto on a bf16 model: every layer on cuSPARSELt, output as the masked path's up to summation order."""
    sam, masked = copy.deepcopy(fp32_model).cuda(), copy.deepcopy(fp32_model).cuda()
    x = X.cuda()
    before = COUNTERS.get("sparse24.cusparselt.layers", 0)
    with (
        apply_patches(sam, ["bf16", "sparse24"]),
        apply_patches(masked, ["bf16", "sparse24"], {"sparse24": {"kernel": "masked"}}),
    ):
        assert COUNTERS["sparse24.cusparselt.layers"] == before + 24
        assert all(isinstance(m.weight, SparseSemiStructuredTensor) for m in encoder_linears(sam).values())
        with torch.no_grad():
            a, b = sam.image_encoder(x).float(), masked.image_encoder(x).float()
    # two bf16 paths summing in different orders; bf16 vs fp32 is ~0.6% on this model (45 dB), not measured here
    assert ((a - b).norm() / b.norm()).item() < 0.03
    assert tensors_equal(sam, fp32_model) == [] and SparseSemiStructuredTensor._FORCE_CUTLASS is False


def test_linear_2d_is_the_linear_of_any_leading_shape():
    linear = nn.Linear(8, 12)
    x = torch.randn(2, 3, 5, 8)
    assert torch.equal(sparse24.linear_2d(linear, x), linear(x))


@pytest.mark.cuda
@pytest.mark.skipif(not CUSPARSELT, reason="needs CUDA with cuSPARSELt")
def test_cuda_cusparselt_encoder_compiles(fp32_model):
    """Under torch.compile the 4-D Linear inputs must not reach the sparse tensor (it refuses `expand`)."""
    sam, x = copy.deepcopy(fp32_model).cuda(), X.cuda()
    with apply_patches(sam, ["bf16", "sparse24"]), torch.no_grad():
        eager = sam.image_encoder(x).float()
        compiled = torch.compile(sam.image_encoder, fullgraph=True)(x).float()
    torch._dynamo.reset()
    assert ((compiled - eager).norm() / eager.norm()).item() < 0.03


@pytest.mark.cuda
@pytest.mark.skipif(not CUSPARSELT, reason="needs CUDA with cuSPARSELt")
def test_cuda_fp32_auto_is_masked_and_cutlass_needs_sm8x(fp32_model):
    sam = copy.deepcopy(fp32_model).cuda()
    dense = [m.weight for m in encoder_linears(sam).values()]
    before = COUNTERS.get("sparse24.masked.layers", 0)
    with PATCH.apply(sam):  # cuSPARSELt takes no fp32 weights: every layer masked, and counted as such
        assert COUNTERS["sparse24.masked.layers"] == before + 24
        assert all(w.device.type == "cpu" for w in dense)  # the dense originals wait on the host
    assert all(m.weight is w and w.is_cuda for m, w in zip(encoder_linears(sam).values(), dense, strict=True))
    with pytest.raises(PatchError, match="dtype"):
        PATCH.apply(sam, Sparse24Config(kernel="cusparselt"))
    if torch.cuda.get_device_capability()[0] != 8:
        with pytest.raises(PatchUnavailable, match="sm8x only"):
            PATCH.apply(sam, Sparse24Config(kernel="cutlass"))


def keep_smallest(weight: torch.Tensor) -> torch.Tensor:
    """A wrong pruning rule: the 2 smallest |w| of every 4 kept."""
    return weight - prune_2_4(weight)  # the complement of the magnitude rule


def test_wide_tolerance_still_fails_a_wrong_pruning_rule(tiny_ref, monkeypatch, tmp_path):
    """Wide bounds (pruning without retraining costs accuracy), but not so wide that any 2:4 pattern passes."""
    samples, _ = load_dataset("synthetic", 16, tmp_path)
    violations, measured = accuracy_violations(tiny_ref, patches_for(["sparse24"]), samples, batch_size=8)
    assert violations == [], measured
    monkeypatch.setattr(sparse24, "prune_2_4", keep_smallest)
    violations, measured = accuracy_violations(tiny_ref, patches_for(["sparse24"]), samples, batch_size=8)
    failed = {v.split(" ")[0] for v in violations}
    assert {"miou_agreement", "miou_gt_drop", "embedding_sqnr_db"} <= failed, measured
