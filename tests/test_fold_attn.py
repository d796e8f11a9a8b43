"""fold_attn: the folded q'.k' against upstream's bias, block selection, stacking, compile and undo."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from segment_anything.modeling import image_encoder as ie

import samrepro
from samrepro import snapshot
from samrepro.patch import PatchError, Undo
from samrepro.patches import fold_attn
from samrepro.patches._relpos import rel_pos_bias, rel_pos_terms
from samrepro.patches.fold_attn import FoldAttnConfig, fold_rel_pos
from tests.attention_blocks import gen, rel_err
from tests.attention_blocks import rel_pos_block as block

REL_TOL = 1e-5  # fp32 CPU: measured <= 1.3e-7 of the output's max magnitude in the cases below


@pytest.mark.parametrize("q_size, d", [((3, 5), 8), ((4, 4), 6), ((1, 7), 5)])
def test_folded_scores_equal_the_materialized_bias(q_size, d):
    """scale * q'.k' is upstream's scaled scores plus bias; a transposed key grid is far off."""
    n, scale = q_size[0] * q_size[1], d**-0.5
    q, k = (torch.randn(2, 3, n, d, generator=gen(s), dtype=torch.float64) for s in (1, 2))
    tables = [torch.randn(2 * s - 1, d, generator=gen(3 + s), dtype=torch.float64) for s in q_size]
    rel_h, rel_w = rel_pos_terms(q, *tables, q_size, q_size)  # 2, 3, h, w, h|w
    ref = scale * q @ k.transpose(-1, -2) + rel_pos_bias(rel_h, rel_w)  # 2, 3, n, n
    q2, k2 = fold_rel_pos(q, k, rel_h.flatten(2, 3), rel_w.flatten(2, 3), scale)
    assert q2.shape[-1] % 8 == 0 and q2.shape[-1] >= d + sum(q_size)
    assert torch.allclose(scale * q2 @ k2.transpose(-1, -2), ref, rtol=0, atol=1e-12)
    if q_size[0] != q_size[1]:  # the grid's sides swapped: rows read as columns
        swapped = fold_rel_pos(q, k, rel_w.flatten(2, 3), rel_h.flatten(2, 3), scale)[1]
        assert not torch.allclose(scale * q2 @ swapped.transpose(-1, -2), ref, atol=1e-3)


# (batch, dim, heads, window, grid): windows padded (7x9 -> 10x10), a non-square global grid, head dims 24 and 20
CASES = {"window5_pad_7x9_bs2": (2, 72, 3, 5, (7, 9)), "global_5x7_bs1": (1, 40, 2, 0, (5, 7))}


@pytest.mark.parametrize("case", CASES)
def test_patched_block_matches_upstream_and_undoes(case):
    batch, dim, heads, window, hw = CASES[case]
    blk = block(dim, heads, window, hw)
    x = torch.randn(batch, *hw, dim, generator=gen(2))
    undo = Undo()
    with torch.no_grad():
        ref = blk(x)
        fold_attn.PATCH.apply_fn(SimpleNamespace(image_encoder=blk), FoldAttnConfig(blocks="all"), undo)
        out = blk(x)
        undo.run()
        after = blk(x)
    assert rel_err(ref, out) <= REL_TOL
    assert "forward" not in vars(blk.attn)
    assert torch.equal(after, ref)


@pytest.mark.parametrize("blocks", fold_attn.BLOCKS)
def test_blocks_picks_the_layers(tiny_ref, blocks):
    sam = copy.deepcopy(tiny_ref)
    layers = [b for b in sam.image_encoder.modules() if isinstance(b, ie.Block)]
    assert {b.window_size == 0 for b in layers} == {True, False}, "the tiny model has both kinds"
    with samrepro.get_patch("fold_attn").apply(sam, FoldAttnConfig(blocks=blocks)):
        taken = [b.window_size == 0 for b in layers if "forward" in vars(b.attn)]  # True: a global block
    n_global = sum(b.window_size == 0 for b in layers)
    windowed, global_ = [False] * (len(layers) - n_global), [True] * n_global
    assert sorted(taken) == {"global": global_, "windowed": windowed, "all": windowed + global_}[blocks]
    assert not any("forward" in vars(b.attn) for b in layers)  # undone


def test_stacked_after_sdpa_takes_only_its_blocks_and_undoes_in_order(tiny_ref):
    sam = copy.deepcopy(tiny_ref)
    state = snapshot.model_state(sam)
    x = torch.randn(1, 3, 256, 256, generator=gen(5))  # the tiny model's input size
    handle = samrepro.apply_patches(sam, ["sdpa", "fold_attn"])
    attn = {b.window_size == 0: b.attn for b in sam.image_encoder.modules() if isinstance(b, ie.Block)}
    assert attn[True].forward.__func__ is fold_attn.encoder_attention_forward
    assert attn[False].forward.__func__ is not fold_attn.encoder_attention_forward  # still sdpa's
    with torch.no_grad():
        ref = tiny_ref.image_encoder(x)
        out = sam.image_encoder(x)
    handle.undo()
    assert rel_err(ref, out) <= REL_TOL
    assert snapshot.model_state(sam) == state


def test_traced_into_a_compiled_block():
    blk = block(48, 2, 0, (6, 8))
    x = torch.randn(2, 6, 8, 48, generator=gen(3))
    undo = Undo()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ref = blk(x)
            fold_attn.PATCH.apply_fn(SimpleNamespace(image_encoder=blk), FoldAttnConfig(), undo)
            out = torch.compile(blk, fullgraph=True, dynamic=False)(x)
            undo.run()
    finally:
        torch._dynamo.reset()
    assert rel_err(ref, out) <= REL_TOL


def test_bad_config_and_missing_blocks_raise():
    with pytest.raises(ValueError, match="blocks must be one of"):
        FoldAttnConfig(blocks="windows")
    encoder = SimpleNamespace(image_encoder=torch.nn.Sequential(block(16, 1, 4, (4, 4))))
    with pytest.raises(PatchError, match="found no such encoder blocks"):
        fold_attn.PATCH.apply_fn(encoder, FoldAttnConfig(blocks="global"), Undo())


def test_windowed_blocks_folded_after_triton_attn_run_upstreams_block_forward(tiny_ref):
    """triton_attn's windowed blocks skip `attn.forward`; fold_attn on them puts upstream's `Block.forward` back, so
    its attention runs, and undo restores triton_attn's. No kernel runs here (the CUDA requirement is bypassed)."""
    from samrepro.patches import triton_attn

    sam, undo = copy.deepcopy(tiny_ref), Undo()
    triton_attn.PATCH.apply_fn(sam, triton_attn.TritonAttnConfig(), undo)
    windowed = [b for b in sam.image_encoder.blocks if b.window_size > 0]
    kernel_forwards = [vars(b)["forward"] for b in windowed]
    assert all(f.__func__ is not ie.Block.forward for f in kernel_forwards)
    folded = Undo()
    fold_attn.PATCH.apply_fn(sam, FoldAttnConfig(blocks="windowed"), folded)
    assert all(vars(b)["forward"].__func__ is ie.Block.forward for b in windowed)
    assert all(vars(b.attn)["forward"].__func__ is fold_attn.encoder_attention_forward for b in windowed)
    folded.run()
    assert [vars(b)["forward"] for b in windowed] == kernel_forwards
    undo.run()
    assert not any("forward" in vars(b) for b in sam.image_encoder.blocks)
