"""sdpa: the rewritten attentions against upstream's, the shared rel-pos helper, and composition."""

from __future__ import annotations

import copy
from types import MethodType

import numpy as np
import pytest
import torch
from segment_anything.modeling import image_encoder as ie
from segment_anything.modeling import transformer as tr

from samrepro import snapshot
from samrepro.equivalence import compare
from samrepro.metrics import check_tolerance
from samrepro.models import load_model
from samrepro.patch import Undo
from samrepro.patches import sdpa
from samrepro.patches._relpos import rel_pos_bias, rel_pos_terms
from samrepro.registry import apply_patches, get_patch
from samrepro.workload import Sample
from tests.attention_blocks import gen, randomize_rel_pos, rel_err

REL_TOL = 1e-5  # fp32 CPU: measured <= 1e-6 of the output's max magnitude


def with_forward(module, fn):
    """Bind `fn(self, *args, backends=[])` as this instance's forward; undo.run() removes it."""
    undo = Undo()
    undo.setattr(module, "forward", MethodType(lambda self, *a, **k: fn(self, *a, **k, backends=[]), module))
    return undo


def block(window: int, hw: tuple[int, int], rel: bool) -> ie.Block:
    size = (window, window) if window else hw
    blk = ie.Block(dim=128, num_heads=2, use_rel_pos=rel, window_size=window, input_size=size).eval()
    if rel:
        randomize_rel_pos(blk.attn)
    return blk


# --- the shared helper -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_size, table",
    [((16, 16), (16, 16)), ((6, 6), (6, 6)), ((5, 7), (5, 7)), ((6, 6), (9, 4))],  # last: tables interpolated
    ids=["global", "window", "non-square", "interpolated"],
)
def test_relpos_bias_equals_upstream(q_size, table):
    heads, dim, n = 3, 16, 2
    rel_pos_h = torch.randn(2 * table[0] - 1, dim, generator=gen(1))
    rel_pos_w = torch.randn(2 * table[1] - 1, dim, generator=gen(2))
    hw = q_size[0] * q_size[1]
    q = torch.randn(n * heads, hw, dim, generator=gen(3))  # upstream's layout: (B*heads, HW, d)
    expected = ie.add_decomposed_rel_pos(torch.zeros(n * heads, hw, hw), q, rel_pos_h, rel_pos_w, q_size, q_size)

    rel_h, rel_w = rel_pos_terms(q.view(n, heads, hw, dim), rel_pos_h, rel_pos_w, q_size, q_size)
    assert rel_h.shape == (n, heads, *q_size, q_size[0])
    assert rel_w.shape == (n, heads, *q_size, q_size[1])
    bias = rel_pos_bias(rel_h, rel_w).reshape(n * heads, hw, hw)  # n * heads, HW, HW
    if table == q_size:  # the one-GEMM path: upstream's products, summed in another order
        torch.testing.assert_close(bias, expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(bias, expected)


def test_relpos_uses_the_module_global_at_call_time(monkeypatch):
    """sync_free swaps `image_encoder.get_rel_pos`; the helper must pick up whatever is there now. Tables that fit
    the grid (2 * size - 1 rows) take the one-GEMM path, which needs no lookup."""
    calls = []
    upstream = ie.get_rel_pos
    monkeypatch.setattr(ie, "get_rel_pos", lambda *a: calls.append(a) or upstream(*a))
    rel_pos_terms(torch.randn(1, 16, 8), torch.randn(9, 8), torch.randn(9, 8), (4, 4), (4, 4))  # interpolated
    assert len(calls) == 2
    rel_pos_terms(torch.randn(1, 16, 8), torch.randn(7, 8), torch.randn(7, 8), (4, 4), (4, 4))
    assert len(calls) == 2


# --- encoder and decoder attention against upstream -----------------------------------------


@pytest.mark.parametrize("rel", [True, False], ids=["rel_pos", "no_rel_pos"])
@pytest.mark.parametrize(
    "window, hw", [(6, (16, 16)), (0, (16, 16)), (0, (5, 7))], ids=["window-padded", "global", "global-non-square"]
)
def test_encoder_attention_matches_upstream(window, hw, rel):
    blk = block(window, hw, rel)
    x = torch.randn(2, *hw, 128, generator=gen(4))  # 16 tokens -> windows of 6 pad to 18
    with torch.no_grad():
        ref = blk(x)
        undo = with_forward(blk.attn, sdpa.encoder_attention_forward)
        out = blk(x)
        undo.run()
    assert "forward" not in vars(blk.attn)
    assert rel_err(ref, out) <= REL_TOL


def test_encoder_attention_follows_bf16():
    blk = block(0, (8, 8), rel=True)
    x = torch.randn(2, 8, 8, 128, generator=gen(5))
    with torch.no_grad():
        ref = blk(x)
        blk = blk.to(torch.bfloat16)
        with_forward(blk.attn, sdpa.encoder_attention_forward)
        out = blk(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(ref, out) <= 3e-2  # bf16 rounding of weights, activations and bias


@pytest.mark.parametrize("downsample", [1, 2], ids=["self", "cross"])
def test_decoder_attention_matches_upstream(downsample):
    attn = tr.Attention(128, num_heads=4, downsample_rate=downsample).eval()
    q = torch.randn(3, 7, 128, generator=gen(6))
    kv = torch.randn(3, 256, 128, generator=gen(7))
    with torch.no_grad():
        ref = attn(q=q, k=kv, v=kv)  # upstream calls it with keywords
        undo = with_forward(attn, sdpa.decoder_attention_forward)
        out = attn(q=q, k=kv, v=kv)
        undo.run()
    assert rel_err(ref, out) <= REL_TOL


# --- a wrong rewrite must fail these checks ----------------------------------------------------


def forward_without_rel_w(self, x, backends):
    """Deliberately wrong: the width term of the bias is dropped."""
    B, H, W, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
    bias = rel_pos_bias(rel_h, torch.zeros_like(rel_w))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


def test_dropped_rel_w_is_caught_by_the_attention_check():
    blk = block(0, (16, 16), rel=True)
    x = torch.randn(2, 16, 16, 128, generator=gen(8))
    with torch.no_grad():
        ref = blk(x)
        with_forward(blk.attn, forward_without_rel_w)
        assert rel_err(ref, blk(x)) > 100 * REL_TOL


def samples(n: int = 1, prompts: int = 3, seed: int = 0) -> list[Sample]:
    """Discs of random colours on a noisy background, points anywhere (no ground truth)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 200, 256
        yy, xx = np.mgrid[0:h, 0:w]
        img = rng.normal(128, 10, (h, w, 3))
        for _ in range(5):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 60)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        pts = rng.uniform([0, 0], [w, h], (prompts, 1, 2)).astype(np.float32)
        out.append(
            Sample(image=img.clip(0, 255).astype(np.uint8), points=pts, labels=np.ones((prompts, 1)), image_id=i)
        )
    return out


@pytest.fixture(scope="module")
def tiny():
    sam = load_model("tiny", weights="random")  # random rel-pos tables: the bias matters
    return sam


def test_declared_tolerance_passes_sdpa_and_catches_dropped_rel_w(tiny):
    batch = samples()
    patched = copy.deepcopy(tiny)
    with get_patch("sdpa").apply(patched):
        assert check_tolerance(compare(tiny, patched, batch), sdpa.PATCH.tolerance) == []

    undo = Undo()
    for attn in (m for m in patched.image_encoder.modules() if isinstance(m, ie.Attention)):
        undo.setattr(attn, "forward", MethodType(lambda self, x: forward_without_rel_w(self, x, []), attn))
    measured = compare(tiny, patched, batch)
    undo.run()
    assert check_tolerance(measured, sdpa.PATCH.tolerance), measured


# --- composition, undo, compile --------------------------------------------------------------


def test_composes_with_sync_free_and_undo_is_exact(tiny, monkeypatch):
    sam = copy.deepcopy(tiny)
    x = torch.randn(1, 3, 256, 256, generator=gen(9))
    state, globals_before = snapshot.model_state(sam), snapshot.global_state()
    upstream_get_rel_pos = ie.get_rel_pos
    with torch.no_grad():
        ref = sam.image_encoder(x)
        with get_patch("sdpa").apply(sam):
            alone = sam.image_encoder(x)

        handle = apply_patches(sam, ["sdpa", "sync_free"])
        attns = [m for m in sam.modules() if isinstance(m, (ie.Attention, tr.Attention))]
        assert all("forward" in vars(m) for m in attns)
        device_side = ie.get_rel_pos
        assert device_side is not upstream_get_rel_pos  # sync_free has swapped it
        calls = []
        monkeypatch.setattr(ie, "get_rel_pos", lambda *a: calls.append(a) or device_side(*a))
        both = sam.image_encoder(x)
        monkeypatch.undo()
        handle.undo()

    assert calls == []  # the tiny model's tables fit its grids: the one-GEMM path looks nothing up
    assert torch.equal(both, alone)  # sync_free is bit-exact
    assert rel_err(ref, both) <= REL_TOL
    assert snapshot.model_state(sam) == state
    assert snapshot.global_state() == globals_before
    assert snapshot.tensors_equal(sam, tiny) == []


def test_traces_without_graph_breaks():
    """compile wraps the encoder after this patch: no Python branching on tensor values allowed."""
    blk = block(0, (8, 8), rel=True)
    with_forward(blk.attn, sdpa.encoder_attention_forward)
    x = torch.randn(1, 8, 8, 128, generator=gen(10))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(blk, backend="eager", fullgraph=True)(x)
            assert torch.equal(out, blk(x))
    finally:
        torch._dynamo.reset()


# --- config --------------------------------------------------------------------------------


def test_config_validates_backend_names():
    with pytest.raises(ValueError, match="valid: flash, efficient, cudnn, math"):
        sdpa.SdpaConfig(backends=("efficent",))
    with pytest.raises(ValueError, match="no float bias"):
        sdpa.SdpaConfig(backends=("flash",))
    cfg = sdpa.SdpaConfig.from_dict({"backends": ["cudnn", "efficient", "cudnn"]})  # as JSON gives it back
    assert cfg.backends == ("cudnn", "efficient")
    assert sdpa.SdpaConfig.from_dict(cfg.to_dict()) == cfg


def test_decoder_can_be_left_alone(tiny):
    sam = copy.deepcopy(tiny)
    with get_patch("sdpa").apply(sam, sdpa.SdpaConfig(decoder=False)):
        assert not any("forward" in vars(m) for m in sam.mask_decoder.modules())
        assert all("forward" in vars(m) for m in sam.image_encoder.modules() if isinstance(m, ie.Attention))


def test_pinned_backends_leave_no_global_state_on_cpu(tiny):
    """On CPU the pin is ignored (those kernels are CUDA's); either way the SDPA flags are untouched."""
    sam = copy.deepcopy(tiny)
    before = snapshot.global_state()["sdpa"]
    with get_patch("sdpa").apply(sam, sdpa.SdpaConfig(backends=("efficient",))), torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256, generator=gen(11)))
    assert snapshot.global_state()["sdpa"] == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["efficient", "cudnn", "math"])
def test_pinned_backend_on_cuda(backend):
    torch.backends.cuda.matmul.allow_tf32 = False
    blk = block(0, (16, 16), rel=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 16, 16, 128, device="cuda", dtype=torch.bfloat16)
    before = snapshot.global_state()["sdpa"]
    with torch.no_grad():
        ref = blk(x)
        undo = Undo()
        backends = [sdpa.BACKENDS[backend]]
        undo.setattr(
            blk.attn, "forward", MethodType(lambda s, t: sdpa.encoder_attention_forward(s, t, backends), blk.attn)
        )
        out = blk(x)
        undo.run()
    assert snapshot.global_state()["sdpa"] == before
    assert rel_err(ref.float(), out.float()) <= 3e-2
