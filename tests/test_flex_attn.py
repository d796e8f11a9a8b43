"""flex_attn: compiled FlexAttention with the rel-pos score_mod against upstream's attention, undo, and the config.

Every compiled shape costs ~5 s of inductor C++ on 2 CPU cores (the first ~20 s), so the shapes are few and odd.
"""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch._inductor.config as inductor_config
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling import image_encoder as ie
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.nn.attention.flex_attention import flex_attention

import samrepro
from samrepro import snapshot
from samrepro.patch import PatchError, Undo
from samrepro.patches import flex_attn
from samrepro.patches._relpos import rel_pos_bias, rel_pos_terms
from samrepro.patches.compile import CompileConfig, knobs_for
from samrepro.patches.flex_attn import FlexAttnConfig
from tests.attention_blocks import gen, rel_err
from tests.attention_blocks import rel_pos_block as block

REL_TOL = 1e-5  # fp32 CPU: measured <= 1.4e-7 of the output's max magnitude (the cases below), as sdpa's test


def patch_block(blk: ie.Block) -> Undo:
    """flex_attn's apply_fn on one block (the registry's apply wants a whole Sam)."""
    undo = Undo()
    flex_attn.PATCH.apply_fn(SimpleNamespace(image_encoder=blk), FlexAttnConfig(), undo)
    return undo


# (batch, dim, heads, window, grid): head dims 24 and 20, windows padded (7x9 -> 10x10), a non-square global grid;
# the tiny model's 6x6 windows and 16x16 grid run in test_traced_into_a_compiled_block and the gates
CASES = {
    "window5_pad_7x9_bs1": (1, 72, 3, 5, (7, 9)),
    "global_5x7_bs1": (1, 40, 2, 0, (5, 7)),
}


@pytest.mark.parametrize("case", CASES)
def test_patched_block_matches_upstream_and_undoes(case):
    batch, dim, heads, window, hw = CASES[case]
    blk = block(dim, heads, window, hw)
    x = torch.randn(batch, *hw, dim, generator=gen(2))
    with torch.no_grad():
        ref = blk(x)
        undo = patch_block(blk)
        out = blk(x)
        assert _debug_get_cache_entry_list(flex_attention.__code__), "the compiled flex_attention ran"
        undo.run()
        after = blk(x)
    assert rel_err(ref, out) <= REL_TOL
    assert "forward" not in vars(blk.attn)
    assert torch.equal(after, ref)
    assert _debug_get_cache_entry_list(flex_attention.__code__) == []  # undo forgot the compiled code


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_score_mod_equals_materialized_bias_and_a_wrong_index_is_caught():
    """Eager flex (no compile): the score_mod is upstream's bias; transposed grid indices are far off."""
    q_size, heads, d = (3, 5), 2, 8
    q, k, v = (torch.randn(1, heads, 15, d, generator=gen(s)) for s in (3, 4, 5))
    tables = [torch.randn(2 * n - 1, d, generator=gen(6 + n)) for n in q_size]
    rel_h, rel_w = rel_pos_terms(q, *tables, q_size, q_size)  # 1, heads, 3, 5, 3|5
    bias = rel_pos_bias(rel_h, rel_w)  # 1, heads, 15, 15
    ref = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + bias, dim=-1) @ v
    rel = torch.cat([rel_h.flatten(2, 3), rel_w.flatten(2, 3)], dim=-1)  # 1, heads, 15, 8
    right = flex_attention(q, k, v, score_mod=flex_attn.rel_pos_score_mod(rel, 3, 5), scale=d**-0.5)
    wrong = flex_attention(q, k, v, score_mod=flex_attn.rel_pos_score_mod(rel, 5, 3), scale=d**-0.5)
    assert rel_err(ref, right) <= REL_TOL
    assert rel_err(ref, wrong) > 100 * REL_TOL


def test_traced_into_a_compiled_block():
    """Under the `compile` patch flex is lowered inside the encoder's graph, where inductor's CPU flex kernel needs
    q, k, v as separate buffers and the rel terms in one fresh buffer (a strided v gave errors of ~2, silently)."""
    blk = block(72, 3, 6, (16, 16))
    x = torch.randn(1, 16, 16, 72, generator=gen(3))
    torch._dynamo.reset()
    try:  # the thread count pinned as `compile` pins it after flex_attn (keys inductor's disk cache on it)
        with torch.no_grad(), inductor_config.patch({"cpp.threads": torch.get_num_threads()}):
            ref = blk(x)
            undo = patch_block(blk)
            out = torch.compile(blk, fullgraph=True, dynamic=False)(x)
            undo.run()
    finally:
        torch._dynamo.reset()
    assert rel_err(ref, out) <= REL_TOL


def test_thread_count_change_after_apply_raises():
    blk = block(32, 2, 0, (4, 4))
    undo = patch_block(blk)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(PatchError, match="CPU threads"), torch.no_grad():
            blk(torch.randn(1, 4, 4, 32))
    finally:
        torch.set_num_threads(threads)
        undo.run()


def test_refuses_encoders_without_rel_pos():
    enc = ImageEncoderViT(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1, use_rel_pos=False)
    with pytest.raises(PatchError, match="use_rel_pos=False"):
        flex_attn.PATCH.apply_fn(SimpleNamespace(image_encoder=enc), FlexAttnConfig(), Undo())


def test_apply_and_undo_leave_the_process_as_found(tiny_ref):
    """Also: a later `compile` of this CPU encoder pins the thread count, so its cached flex kernel is keyed on it."""
    sam = copy.deepcopy(tiny_ref)
    state, globals_before = snapshot.model_state(sam), snapshot.global_state()
    with samrepro.get_patch("flex_attn").apply(sam):
        assert all("forward" in vars(m) for m in sam.image_encoder.modules() if isinstance(m, ie.Attention))
        assert knobs_for(sam.image_encoder, CompileConfig())["cpp.threads"] == torch.get_num_threads()
    assert "cpp.threads" not in knobs_for(sam.image_encoder, CompileConfig())
    assert snapshot.model_state(sam) == state
    assert snapshot.global_state() == globals_before


def test_cpu_requirement_gives_its_reason(monkeypatch):
    from torch._inductor.kernel.flex import flex_cpu

    assert (flex_attn.PATCH.unavailable_reason("cpu") is None) == flex_cpu.check_cpu_supported()
    monkeypatch.setattr(flex_cpu, "check_cpu_supported", lambda: False)
    assert "needs AVX2" in flex_attn.PATCH.unavailable_reason("cpu")


def test_config_validates_and_round_trips():
    cfg = FlexAttnConfig(mode="max-autotune-no-cudagraphs", kernel_options={"BLOCK_M": 64, "fwd_BLOCK_N": 32})
    assert FlexAttnConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="mode must be one of"):
        FlexAttnConfig(mode="max-autotune")  # CUDA graphs around each call: refused
    with pytest.raises(ValueError, match="not FlexKernelOptions"):
        FlexAttnConfig(kernel_options={"BLOCK_K": 64})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window, hw", [(14, (20, 20)), (0, (32, 32))], ids=["window14", "global32"])
def test_patched_block_on_cuda_with_vit_h_head_dim(window, hw, dtype):
    """Head dim 80 (vit_h) is no power of two; the Triton flex kernel pads it."""
    torch.backends.cuda.matmul.allow_tf32 = False
    blk = block(160, 2, window, hw).cuda()
    x = torch.randn(2, *hw, 160, device="cuda")
    with torch.no_grad():
        ref = blk(x)
        blk = blk.to(dtype)
        undo = patch_block(blk)
        out = blk(x.to(dtype))
        undo.run()
    assert rel_err(ref, out.float()) <= (REL_TOL if dtype == torch.float32 else 3e-2)
