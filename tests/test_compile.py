"""compile: the encoder is an OptimizedModule, its inductor knobs hold only inside its calls, undo is exact."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch._inductor.compile_fx
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.virtualized import V

import samrepro.patches.compile  # noqa: F401  (registers it)
from samrepro.equivalence import compare
from samrepro.metrics import check_tolerance
from samrepro.models import fp32_reference_mode, load_model
from samrepro.patch import Patch, PatchConfig, PatchError, Tolerance, Undo, is_compiled
from samrepro.patches._persistent import PersistentRows
from samrepro.patches.compile import SEED_KNOBS, CompileConfig
from samrepro.registry import apply_patches, get_patch
from samrepro.snapshot import global_state, model_state
from samrepro.workload import Sample

PATCH = get_patch("compile")
CUDA = torch.cuda.is_available()
INDUCTOR_DEFAULTS = {
    "epilogue_fusion": True,
    "coordinate_descent_tuning": False,
    "coordinate_descent_check_all_directions": False,
}
TUTORIAL = {k: not v for k, v in INDUCTOR_DEFAULTS.items()}  # the torchao tutorial's opt-in knobs


def outside_state() -> dict:
    """global_state() minus the `__compiled_fn_*` / `__resume_at_*` globals dynamo installs in the
    traced module (segment_anything.modeling.image_encoder) while compiled code is alive; they are
    dynamo's own bookkeeping, dropped again by torch._dynamo.reset()."""
    state = global_state()
    state["upstream"] = {k: v for k, v in state["upstream"].items() if not k[1].startswith("__")}
    return state


def knob_values() -> dict:
    return {k: getattr(inductor_config, k) for k in SEED_KNOBS}


@pytest.fixture
def sam():
    fp32_reference_mode()
    model = load_model("tiny", weights="random")
    yield model
    torch._dynamo.reset()


@pytest.fixture
def spy_compiler(monkeypatch):
    """Replaces inductor's compile_fx (what torch.compile's inductor backend calls) with a spy that
    records the inductor config it is called under and returns the graph uncompiled (fast)."""
    seen: list[dict] = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        choices = {"choices": V.choices, "choices_knob": inductor_config.inductor_choices_class}
        seen.append({**knob_values(), **choices, "mode_options": dict(config_patches or {})})
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", spy)
    return seen


def samples(n: int = 2, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate([(200, 256), (256, 180), (256, 256), (120, 240)][:n]):
        pts = np.stack([rng.uniform(0, w, 4), rng.uniform(0, h, 4)], -1)[:, None].astype(np.float32)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(Sample(image=image, points=pts, labels=np.ones((4, 1), np.int64), image_id=i))
    return out


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_are_what_the_published_rows_ran():
    cfg = CompileConfig()
    assert (cfg.mode, cfg.fullgraph, cfg.dynamic) == ("max-autotune", True, False)
    assert cfg.inductor_patch() == INDUCTOR_DEFAULTS
    assert CompileConfig(**TUTORIAL).inductor_patch() == TUTORIAL
    assert cfg.uses_cudagraphs()  # max-autotune turns on triton.cudagraphs
    assert "force_fuse_int_mm_with_mul" not in cfg.inductor_patch()  # int8's knob, not compile's
    assert CompileConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "fastest"}, "compile mode must be one of"),
        ({"fullgraph": 1}, "fullgraph must be a bool"),
        ({"epilogue_fusion": "no"}, "epilogue_fusion must be a bool"),
        ({"dynamic": "auto"}, "dynamic must be True, False or None"),
        ({"inductor_options": {"no_such_knob": 1}}, "not torch._inductor.config options"),
        ({"inductor_options": {"epilogue_fusion": True}}, "through the config fields"),
        ({"inductor_options": [("freezing", True)]}, "must be a dict"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig(**kwargs)


def test_cudagraph_detection():
    assert not CompileConfig(mode="default").uses_cudagraphs()
    assert not CompileConfig(mode="max-autotune-no-cudagraphs").uses_cudagraphs()
    assert CompileConfig(mode="reduce-overhead").uses_cudagraphs()
    assert CompileConfig(mode="default", inductor_options={"triton.cudagraphs": True}).uses_cudagraphs()


# --- apply / undo / scoping (spy compiler: dynamo traces for real, inductor is skipped) -------------


def test_apply_wraps_and_undo_returns_the_original(sam, spy_compiler):
    original, before = sam.image_encoder, model_state(sam)
    handle = PATCH.apply(sam)
    assert is_compiled(sam.image_encoder)
    assert sam.image_encoder._orig_mod is original
    assert sam.image_encoder.img_size == original.img_size  # attribute reads still reach the encoder
    with torch.no_grad():
        out = sam.image_encoder(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 128, 16, 16) and len(spy_compiler) == 1
    handle.undo()
    assert sam.image_encoder is original
    assert model_state(sam) == before


def test_knobs_hold_inside_calls_only(sam, spy_compiler):
    flipped = {k: not v for k, v in knob_values().items()}  # so every knob visibly changes
    full, outside = global_state(), outside_state()
    handle = PATCH.apply(sam, CompileConfig(**flipped))
    assert outside_state() == outside  # apply alone changes nothing global
    with torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256))
    seen = spy_compiler[0]
    assert {k: seen[k] for k in SEED_KNOBS} == flipped
    assert seen["mode_options"]["max_autotune"] is True  # the mode is inductor's own scoped patch
    assert {k: seen["mode_options"][k] for k in SEED_KNOBS} == flipped  # and the knobs win over it
    assert outside_state() == outside  # ... nor a call that compiled
    handle.undo()
    assert global_state() == full  # reset() dropped dynamo's installed globals too


def test_the_raised_row_limit_holds_inside_the_compile_only(sam, spy_compiler):
    """persistent_rows: inductor's heuristics handler is swapped in for the compile, and the knob the FX graph cache
    keys on is set with it; neither outside the call."""
    outside = V.choices
    handle = PATCH.apply(sam, CompileConfig(mode="default", persistent_rows=2048))
    with torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256))
    handle.undo()
    (seen,) = spy_compiler
    assert isinstance(seen["choices"], PersistentRows) and seen["choices"].limit == 2048
    assert seen["choices_knob"] is not None and seen["choices_knob"]().limit == 2048
    assert V.choices is outside and inductor_config.inductor_choices_class is None


def test_max_autotune_without_coordinate_descent(sam, spy_compiler):
    handle = PATCH.apply(sam, CompileConfig(mode="max-autotune"))
    with torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256))
    options = spy_compiler[0]["mode_options"]
    assert options["max_autotune"] is True and options["coordinate_descent_tuning"] is False
    handle.undo()


def test_mode_overrides_the_surrounding_config(sam, spy_compiler):
    """Companion: torch.compile(mode="max-autotune") turns coordinate descent on whatever the config says."""
    encoder = torch.compile(sam.image_encoder, mode="max-autotune", fullgraph=True, dynamic=False)
    with inductor_config.patch(coordinate_descent_tuning=False), torch.no_grad():
        encoder(torch.randn(1, 3, 256, 256))
    assert spy_compiler[0]["mode_options"]["coordinate_descent_tuning"] is True


def test_knobs_hold_at_recompile(sam, spy_compiler):
    handle = PATCH.apply(sam, CompileConfig(mode="default", epilogue_fusion=False))
    with torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256))
        sam.image_encoder(torch.randn(2, 3, 256, 256))  # new static shape: compiles again
    assert [s["epilogue_fusion"] for s in spy_compiler] == [False, False]
    assert inductor_config.epilogue_fusion is True
    handle.undo()


def test_knobs_scoped_to_apply_alone_miss_the_compile(sam, spy_compiler):
    """Companion: patching the config around apply (the naive way) does not reach the compile."""
    with inductor_config.patch(epilogue_fusion=False):
        encoder = torch.compile(sam.image_encoder, fullgraph=True, dynamic=False)
    with torch.no_grad():
        encoder(torch.randn(1, 3, 256, 256))
    assert spy_compiler[0]["epilogue_fusion"] is True  # the knob was gone by compile time


def test_leaky_variant_is_caught(sam, spy_compiler):
    """Companion: a compile that sets an inductor flag globally fails the state comparison."""

    def leaky_apply(model, config, undo: Undo) -> None:
        inductor_config.epilogue_fusion = False  # never restored
        undo.setattr(model, "image_encoder", torch.compile(model.image_encoder))

    leaky = Patch("leaky_compile", "test only", PatchConfig, leaky_apply, Tolerance(), touches_encoder=False)
    before = global_state()
    try:
        leaky.apply(sam).undo()
        assert global_state() != before
        assert global_state()["inductor"]["epilogue_fusion"] != before["inductor"]["epilogue_fusion"]
    finally:
        inductor_config.epilogue_fusion = True


def test_encoder_patches_refused_after_compile(sam, spy_compiler):
    def noop(model, config, undo):
        pass

    encoder_patch = Patch("encoder_noop", "test only", PatchConfig, noop, Tolerance(), touches_encoder=True)
    handle = PATCH.apply(sam)
    with pytest.raises(PatchError, match="already wrapped"):
        get_patch("sync_free").apply(sam)
    with pytest.raises(PatchError, match="already wrapped"):
        encoder_patch.apply(sam)
    with pytest.raises(PatchError, match="already applied"):
        PATCH.apply(sam)
    handle.undo()
    encoder_patch.apply(sam)  # fine again once the encoder is back


def test_refuses_an_encoder_compiled_elsewhere(sam, spy_compiler):
    sam.image_encoder = torch.compile(sam.image_encoder)
    with pytest.raises(PatchError, match="already wrapped"):
        PATCH.apply(sam)


def test_composes_after_sync_free(sam, spy_compiler):
    original, outside = sam.image_encoder, outside_state()
    handle = apply_patches(sam, ["compile", "sync_free"], {"compile": {"mode": "default"}})
    assert handle.names == ["sync_free", "compile"]
    with torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256))
    handle.undo()
    assert sam.image_encoder is original and outside_state() == outside


# --- real inductor (CPU C++ backend): accuracy -------------------------------------------------------


@pytest.mark.heavy  # the registry gate (tests/test_gates.py) already compiles the default config in CI
def test_within_tolerance_default_mode(sam):
    """Real inductor compile (mode=default) of the tiny encoder, measured against the eager fp32 model."""
    ref = load_model("tiny", weights="random")
    outside = outside_state()
    handle = PATCH.apply(sam, CompileConfig(mode="default"))
    measured = compare(ref, sam, samples())
    assert outside_state() == outside
    handle.undo()
    assert check_tolerance(measured, PATCH.tolerance) == [], measured
    assert outside_state() == outside


@pytest.mark.heavy
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA")])],
)
def test_within_tolerance_default_config(device):
    """The shipped config (max-autotune + seed knobs; CUDA graphs on CUDA, none on CPU)."""
    fp32_reference_mode()
    ref = load_model("tiny", device=device, weights="random")
    sam = load_model("tiny", device=device, weights="random")
    outside = outside_state()
    start = time.perf_counter()
    handle = PATCH.apply(sam)
    measured = compare(ref, sam, samples())
    print(f"max-autotune compile + compare on {device}: {time.perf_counter() - start:.1f} s, {measured}")
    assert outside_state() == outside
    handle.undo()
    assert check_tolerance(measured, PATCH.tolerance) == [], measured


# --- CUDA: CUDA graphs overwrite their outputs ---------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("clone_output", [True, False])
def test_kept_outputs_survive_cudagraph_replays(clone_output):
    fp32_reference_mode()
    sam = load_model("tiny", device="cuda", weights="random")
    x1, x2 = torch.randn(2, 1, 3, 256, 256, device="cuda")
    counters.clear()
    # As in the plan, after sync_free (seen on H200: CUDA graphs are recorded with or without it).
    # reduce-overhead: the CUDA graphs of max-autotune without its minutes of autotuning.
    handle = apply_patches(
        sam, ["sync_free", "compile"], {"compile": CompileConfig(mode="reduce-overhead", clone_output=clone_output)}
    )
    try:
        with torch.no_grad():
            expected = sam.image_encoder._orig_mod(x1)
            for _ in range(3):  # warm-up, then record, then replay
                first = sam.image_encoder(x1)
            second = sam.image_encoder(x2)  # replays into the same pool
            assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
            if clone_output:
                assert torch.allclose(first, expected, atol=1e-4) and not torch.equal(first, second)
            else:  # the reason for clone_output: a replay hands back the same tensor, refilled
                assert first is second or torch.equal(first, second)
                assert not torch.allclose(first, expected, atol=1e-4)  # silently x2's embedding now
    finally:
        handle.undo()
