"""Launches fitted to the GPU's shared memory: rel_pos_attention's picks per GPU limit, its estimate against what
Triton allocates (compiled for each target; no GPU needed), the picks' answers in Triton's CPU interpreter, and
fp8_rows' shared memory, small enough not to need fitting.

The interpreter checks run in a child process (`python tests/test_launch_fit.py OUT.json`, TRITON_INTERPRET=1), as
in test_triton_attn.py, whose helpers they reuse.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

KIB = 1024
# Opt-in shared memory per block and compute capability, from the CUDA C++ Programming Guide's technical
# specifications per compute capability: 99 KiB on 8.6 and 8.9 (Triton's error on an RTX 3090 or A6000 reads
# "Hardware limit: 101376"), 163 KiB on 8.0 and 8.7, 227 KiB on 9.0. 101 KiB is the 4090's figure as sometimes
# quoted (its 101,376 bytes counted in kB), checked too.
GPUS = {
    "sm86_99k": (99 * KIB, (8, 6)),  # RTX 3090, RTX A6000
    "sm89_99k": (99 * KIB, (8, 9)),  # RTX 4090, L4
    "sm89_101k": (101 * KIB, (8, 9)),
    "sm80_163k": (163 * KIB, (8, 0)),  # A100
    "sm87_163k": (163 * KIB, (8, 7)),  # Jetson AGX Orin
    "sm90_227k": (227 * KIB, (9, 0)),  # H100, H200: where `default_launch` was measured
}
# SAM's attention as triton_attn calls it: name: (kh, kw, head_dim, split, bias given). Windows (14 x 14 = 196 keys)
# go through the table kernel, which always takes the one-hot bias; global blocks (64 x 64 = 4096 keys) take the
# table's bias. vit_h's head dim 80 runs split (the patch's default) or padded to 128.
SHAPES = {
    "vit_b_window": (14, 14, 64, False, "onehot"),
    "vit_b_global": (64, 64, 64, False, ""),
    "vit_h_window_split": (14, 14, 80, True, "onehot"),
    "vit_h_window_padded": (14, 14, 80, False, "onehot"),
    "vit_h_global_split": (64, 64, 80, True, ""),
    "vit_h_global_padded": (64, 64, 80, False, ""),
}
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}  # itemsize
# Limits below any GPU's, to make the picks step down past the stages, into BLOCK_N, BLOCK_M and the split
TIGHT = {"sm86_64k": (64 * KIB, (8, 6)), "sm86_32k": (32 * KIB, (8, 6)), "sm90_24k": (24 * KIB, (9, 0))}
NONE_FITS = (1 * KIB, (8, 6))


def rpa():
    from samrepro.kernels import rel_pos_attention

    return rel_pos_attention


def problem(shape: str, dtype: str):
    kh, kw, d, _, _ = SHAPES[shape]
    return rpa().Problem(kh, kw, d, DTYPES[dtype], DTYPES[dtype])


def pick(shape: str, dtype: str, limit: int, capability: tuple[int, int]):
    """The launch fitted to `limit` for SAM's `shape` with nothing given, as the op picks it on such a GPU."""
    *_, split, bias = SHAPES[shape]
    return rpa().fit_launch(problem(shape, dtype), (0, 0, 0, 0, bias), split, limit, capability)


def table(shape: str, dtype: str) -> tuple:
    """`default_launch`'s launch, with the bias the op forces."""
    kh, kw, d, split, bias = SHAPES[shape]
    bm, bn, warps, stages, table_bias = rpa().default_launch(kh * kw, d, DTYPES[dtype], split)
    return bm, bn, warps, stages, bias or table_bias


CASES = [(s, d) for s in SHAPES for d in DTYPES]


# --- the picks (pure Python) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", GPUS)
def test_picks_fit_the_limit_and_keep_the_table_where_it_fits(gpu):
    """Every pick fits; it is the table's launch exactly when that fits, and a smaller one otherwise."""
    limit, capability = GPUS[gpu]
    for shape, dtype in CASES:
        fit = pick(shape, dtype, limit, capability)
        need = rpa().shared_bytes(problem(shape, dtype), fit.launch, fit.split, capability)
        assert need <= limit, f"{shape} {dtype}: {need} > {limit}"
        table_fits = rpa().shared_bytes(problem(shape, dtype), table(shape, dtype), SHAPES[shape][3], capability)
        if table_fits <= limit:
            assert (fit.launch, fit.split, fit.how) == (table(shape, dtype), SHAPES[shape][3], "table"), shape
        else:
            assert fit.how == "stepped_down" and fit.launch != table(shape, dtype), f"{shape} {dtype}"


@pytest.mark.parametrize("shape, dtype", CASES)
def test_h100_picks_the_measured_table(shape, dtype):
    assert pick(shape, dtype, *GPUS["sm90_227k"]) == (table(shape, dtype), SHAPES[shape][3], "table")


@pytest.mark.parametrize("gpu", ["sm86_99k", "sm89_99k", "sm89_101k"])
def test_99k_gpus_step_down_only_the_padded_vit_h_global_launch(gpu):
    """At 99-101 KiB only the 128 x 64 three-stage launch of vit_h's padded global blocks (16-bit) is over: it keeps
    its blocks with one stage less. Everything the patch runs by default keeps the H100's launch."""
    stepped = {(s, d): pick(s, d, *GPUS[gpu]) for s, d in CASES if pick(s, d, *GPUS[gpu]).how != "table"}
    assert set(stepped) == {("vit_h_global_padded", "bfloat16"), ("vit_h_global_padded", "float16")}
    assert {fit.launch for fit in stepped.values()} == {(128, 64, 8, 2, "gather")}
    assert table("vit_h_global_padded", "bfloat16") == (128, 64, 8, 3, "gather")


def test_a100_keeps_every_table_launch():
    assert all(pick(s, d, *GPUS["sm80_163k"]).how == "table" for s, d in CASES)


def test_step_down_order():
    """As the limit falls, the pick moves along the documented order: fewer stages first, then a smaller BLOCK_N,
    then a smaller BLOCK_M, then (padded head dims) the split head dim; the smallest launch last. On sm8x one stage
    holds as much as two (one K/V pair in shared memory either way), so the single-stage launch is never picked."""
    picks = falling_limit_picks(problem("vit_h_global_padded", "bfloat16"), (9, 0))
    padded = [(f.launch[0], f.launch[1], f.launch[3]) for f in picks if not f.split]
    split = [(f.launch[0], f.launch[1], f.launch[3]) for f in picks if f.split and f.how != "over_limit"]
    assert padded[:3] == [(128, 64, 3), (128, 64, 2), (128, 64, 1)]  # stages first
    assert padded[3][:2] == (128, 32)  # then BLOCK_N, stages back at the table's
    assert padded == sorted(padded, reverse=True) and split == sorted(split, reverse=True)
    assert [f.split for f in picks] == sorted(f.split for f in picks)  # split only once padded has nothing left
    assert padded[-1] == (16, 16, 1) and split  # the split head dim holds 80 columns where padded holds 128
    assert all(f.launch[2] == max(1, 8 * f.launch[0] // 128) for f in picks if not f.split)  # warps follow BLOCK_M
    assert picks[-1].how == "over_limit" and picks[-1].launch[:4] == (16, 16, 1, 1)
    sm86 = falling_limit_picks(problem("vit_h_global_padded", "bfloat16"), (8, 6))
    assert [f.launch[:4] for f in sm86[:3]] == [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)]
    assert all(f.launch[3] > 1 for f in sm86 if f.how != "over_limit")


def falling_limit_picks(prob, capability: tuple[int, int]) -> list:
    """The distinct picks for `prob` as the limit falls from 200 KiB to nothing in 256-byte steps."""
    picks = []
    for limit in range(200 * KIB, 0, -KIB // 4):
        fit = rpa().fit_launch(prob, (0, 0, 0, 0, ""), False, limit, capability)
        if not picks or fit != picks[-1]:
            picks.append(fit)
    return picks


def test_given_launch_parameters_stay_or_raise():
    prob, (limit, capability) = problem("vit_h_global_padded", "bfloat16"), GPUS["sm86_99k"]
    kept = rpa().fit_launch(prob, (0, 32, 0, 0, ""), False, limit, capability)
    assert kept.launch[1] == 32 and kept.how == "table"  # 128 x 32, 3 stages fits: the rest is the table's
    fitted = rpa().fit_launch(prob, (128, 64, 0, 0, ""), False, limit, capability)
    assert fitted.launch[:4] == (128, 64, 8, 2)  # the blocks as given, the stages fitted
    with pytest.raises(ValueError, match=r"over this GPU's 99 KiB per block \(sm86\)") as err:
        rpa().fit_launch(prob, (128, 64, 0, 4, ""), False, limit, capability)
    assert "\n" not in str(err.value)


def test_nothing_fits_falls_back_to_the_smallest_launch():
    """An absurd limit: the smallest launch (the split head dim where that holds less) as "over_limit"."""
    for shape, dtype in CASES:
        fit = pick(shape, dtype, *NONE_FITS)
        assert fit.how == "over_limit" and fit.launch[:4] == (16, 16, 1, 1), shape
        assert fit.split == (SHAPES[shape][2] == 80)


def test_the_op_fits_the_launch_to_the_device_it_runs_on(monkeypatch):
    """The op (its fake implementation, on meta tensors) asks `device_limits` for q's device: given parameters that
    cannot fit raise there, so under torch.compile too."""
    module = rpa()
    q = torch.empty(1, 16, 4096, 80, device="meta", dtype=torch.bfloat16)
    rel = torch.empty(1, 16, 4096, 64, device="meta", dtype=torch.bfloat16)
    args = (q, q, q, rel, rel, 80**-0.5)
    monkeypatch.setattr(module, "device_limits", lambda device: GPUS["sm86_99k"])
    assert torch.ops.samrepro.rel_pos_attention(*args).shape == q.shape
    with pytest.raises(ValueError, match=r"99 KiB per block \(sm86\)"):
        torch.ops.samrepro.rel_pos_attention(*args, 128, 64, 0, 4)


def test_device_limits_reads_torchs_opt_in_figure():
    assert rpa().device_limits(torch.device("cpu")) is None
    assert "shared_memory_per_block_optin" in dir(torch._C._CudaDeviceProperties)


# --- against Triton's own figure (compiled for each target, no GPU) ---------------------------------------------


def compiled_shared(prob, launch: tuple, split: bool, arch: int, tables: bool) -> int:
    """`metadata.shared` of the attention kernel compiled for sm`arch`."""
    from tests.attention_blocks import compile_attention_kernel  # not at the top: this file also runs as a script

    dtype = {2: "bf16", 4: "fp32"}[prob.itemsize]
    return compile_attention_kernel(prob.kh, prob.kw, prob.head_dim, launch, split, dtype, arch, tables).metadata.shared


# (gpu, shape, dtype): the picks SAM runs, on each kind of target; fp16 compiles as bf16 (the same bytes)
COMPILED = [
    *((gpu, shape, "bfloat16") for gpu in ("sm86_99k", "sm90_227k") for shape in SHAPES),
    *((gpu, shape, "float32") for gpu in ("sm86_99k", "sm90_227k") for shape in ("vit_b_global", "vit_h_window_split")),
    ("sm89_99k", "vit_h_global_padded", "bfloat16"),
    ("sm80_163k", "vit_h_global_padded", "bfloat16"),
    ("sm80_163k", "vit_b_window", "float32"),
    *((gpu, "vit_h_global_padded", "bfloat16") for gpu in TIGHT),
]


@pytest.mark.slow
@pytest.mark.parametrize("gpu, shape, dtype", COMPILED)
def test_estimate_bounds_what_triton_allocates(gpu, shape, dtype):
    limit, (major, minor) = {**GPUS, **TIGHT}[gpu]
    fit = pick(shape, dtype, limit, (major, minor))
    estimate = rpa().shared_bytes(problem(shape, dtype), fit.launch, fit.split, (major, minor))
    tables = SHAPES[shape][0] == 14
    shared = compiled_shared(problem(shape, dtype), fit.launch, fit.split, 10 * major + minor, tables)
    assert shared <= estimate <= limit, f"{fit}: Triton {shared}, estimate {estimate}, limit {limit}"
    assert estimate <= 2 * shared  # Triton's figure was 0.66-1.0 of the estimate here: K and V were pipelined


@pytest.mark.slow
def test_estimate_bounds_the_table_kernel_on_a_global_grid():
    """The table kernel's scratch before the loop grows with the grid (64 x 64: 127-row tables); still bounded."""
    prob = rpa().Problem(64, 64, 64, 2, 2)
    launch = (64, 64, 4, 3, "onehot")
    assert compiled_shared(prob, launch, False, 90, True) <= rpa().shared_bytes(prob, launch, False, (9, 0))


# --- fp8_rows: shared memory too small to fit --------------------------------------------------------------------


# K, GELU, LayerNorm, dtype, launch ((0, 0, 0): the default): SAM's widths and the interpreter tests' launches
FP8_LAUNCHES = [
    (768, False, True, "bf16", (0, 0, 0)),
    (3072, True, False, "bf16", (0, 0, 0)),
    (1280, False, True, "bf16", (0, 0, 0)),
    (5120, True, False, "fp32", (0, 0, 0)),
    (72, True, True, "bf16", (8, 128, 4)),
    (72, True, False, "bf16", (4, 32, 2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [89, 90])
@pytest.mark.parametrize("k, gelu, norm, dtype, launch", FP8_LAUNCHES)
def test_fp8_rows_shared_memory_is_small_on_any_sm89_gpu(arch, k, gelu, norm, dtype, launch):
    """No dots, no loads through shared memory: only reduction scratch, under 4 KiB (the smallest sm89+ limit is 99
    KiB), so fp8_rows' launches need no fitting."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from samrepro.kernels import fp8_rows as fr

    kernel = fr._fp8_rows_fwd
    bm, bk, warps = (g or d for g, d in zip(launch, fr.default_launch(k, norm)))
    consts = {"K": k, "GELU": gelu, "NORM": norm, "BLOCK_M": bm, "BLOCK_K": bk}
    types = {"x_ptr": f"*{dtype}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}"}
    types |= {"M": "i32", "stride_xm": "i32", "lb": "fp32", "eps": "fp32"}
    signature = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
    aligned = [i for i, n in enumerate(kernel.arg_names) if n.endswith("_ptr") or n == "stride_xm"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in consts.items()}, attrs)
    assert triton.compile(src, GPUTarget("cuda", arch, 32), {"num_warps": warps}).metadata.shared <= 4 * KIB


# --- in Triton's CPU interpreter ----------------------------------------------------------------------------------


def small_case(shape: str, dtype: str, fit) -> tuple:
    """A small problem on which to run a pick for `shape`: one 14 x 14 window, or 4 rows of SAM's 64-wide global
    grid (the same key-block paths as 64 x 64): (batch, heads, kh, kw, d, BLOCK_M, BLOCK_N, dtype)."""
    kh, kw, d, _, _ = SHAPES[shape]
    return (1, 1, kh if kh == 14 else 4, kw, d, fit.launch[0], fit.launch[1], dtype)


def interpreter_checks() -> dict:
    """Run in the child under TRITON_INTERPRET=1: every pick (GPU limits and tighter ones) on a small problem, and
    the op fitting its launch to a patched `device_limits`."""
    from samrepro.kernels import COUNTERS
    from tests.test_triton_attn import TOL, case_error, tables_error, widen_bf16_dots

    module = rpa()
    assert module.INTERPRETED, "the child must run with TRITON_INTERPRET=1"
    widen_bf16_dots()
    res = {"picks": {}}
    for limit, capability in {**GPUS, **TIGHT}.values():
        for shape, dtype in CASES:
            fit = pick(shape, dtype, limit, capability)
            case = small_case(shape, dtype, fit)
            key = f"{shape} {dtype} {fit.launch[:2]} split={fit.split}"
            if key not in res["picks"]:
                run = tables_error if SHAPES[shape][0] == 14 else case_error
                bias = {} if run is tables_error else {"bias": fit.launch[4]}
                err = run(module, *case, split=fit.split, **bias)
                res["picks"][key] = {"err": err, "tol": TOL[dtype], "how": fit.how}

    window = (1, 1, 14, 14, 64, 0, 0, "float32")
    fitted = {}
    for name, limits in {"stepped": (32 * KIB, (8, 6)), "none_fits": NONE_FITS}.items():
        module.device_limits = lambda device, limits=limits: limits
        COUNTERS.clear()
        err = case_error(module, *window)  # the table: 64 x 32, 2 stages, per-key bias (~40 KiB on sm86)
        fitted[name] = {"err": err, "tol": TOL["float32"], "counters": dict(COUNTERS)}
    try:
        case_error(module, *window[:5], 64, 32, "float32")
        fitted["given_error"] = ""
    except ValueError as e:
        fitted["given_error"] = str(e)
    res["fitted"] = fitted
    return res


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict:
    from tests.conftest import interpreted_child  # not at the top: this file also runs as the child's script

    return interpreted_child(__file__, tmp_path_factory)


def test_every_pick_computes_the_right_answer(interp):
    picks = interp["picks"]
    bad = {k: v["err"] for k, v in picks.items() if not v["err"] <= v["tol"]}
    assert not bad, bad
    assert sum(v["how"] == "stepped_down" for v in picks.values()) >= 10  # the tight limits' smaller blocks ran too


def test_op_steps_down_counts_and_raises_in_the_interpreter(interp):
    fitted = interp["fitted"]
    for name, key in (("stepped", "stepped_down"), ("none_fits", "over_limit")):
        res = fitted[name]
        assert res["err"] <= res["tol"], name
        assert res["counters"] == {"rel_pos_attention.triton": 1, f"rel_pos_attention.triton.{key}": 1}, name
    assert "over this GPU's 1 KiB per block (sm86)" in fitted["given_error"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.` from the repository root
    Path(sys.argv[1]).write_text(json.dumps(interpreter_checks()))
