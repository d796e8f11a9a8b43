"""fp8_fused: the row-wise float8 quantization kernel against its torch reference (Triton's CPU interpreter, and
bit for bit on sm89+), the patch's refusals, and on sm89+ its modules, agreement with `fp8`, compile and undo.

The interpreter runs in a child process (`python tests/test_fp8_fused.py OUT.json`, TRITON_INTERPRET=1), as in
test_triton_attn.py. Triton 3.6's interpreter casts fp32 to e4m3 in two ways the GPU does not: a value just below
a power of two gets the code of half that power (127.4 -> 64, not 128), exact ties round away from zero (168 ->
176, not 160), and values below 2^-6 (subnormal codes) are truncated towards zero. The interpreter checks allow exactly
those, and nothing else, to differ.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from samrepro.kernels import COUNTERS
from samrepro.patch import PatchError, PatchUnavailable, Undo
from samrepro.patches import fp8_fused
from samrepro.patches.fp8 import Fp8Config
from samrepro.registry import apply_patches, get_patch
from samrepro.snapshot import model_state, tensors_equal

PATCH = get_patch("fp8_fused")
SM89 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
HAS_TRITON = importlib.util.find_spec("triton") is not None
LB = Fp8Config().activation_value_lb
# rows, K, dtype, GELU, LayerNorm: SAM's widths (vit_b 768/3072, vit_h 1280/5120) and odd small ones
CASES = {
    "k40_gelu_bf16": (5, 40, torch.bfloat16, True, False),
    "k96_fp16": (9, 96, torch.float16, False, False),
    "k96_norm_gelu_fp16": (9, 96, torch.float16, True, True),
    "k768_bf16": (6, 768, torch.bfloat16, False, False),
    "k768_norm_bf16": (6, 768, torch.bfloat16, False, True),
    "k1280_bf16": (7, 1280, torch.bfloat16, False, False),
    "k1280_norm_bf16": (7, 1280, torch.bfloat16, False, True),
    "k320_norm_fp32": (5, 320, torch.float32, False, True),  # 256 + a partial chunk of 64 with the norm's launch
    "k3072_gelu_fp32": (3, 3072, torch.float32, True, False),
    "k5120_gelu_bf16": (3, 5120, torch.bfloat16, True, False),
}


NORM_OFFSET = 40.0  # the rows the LayerNorm gets sit far from 0, where E[x^2] - E[x]^2 would cancel


def case_input(rows: int, k: int, dtype: torch.dtype, device: str = "cpu", offset: float = 0.0) -> torch.Tensor:
    """3 * N(0, 1) + offset rows as a strided view of a wider tensor; row 1 all `offset` (a padded token), row 2
    within (-0.75, 0.15), where max |GELU| is GELU's negative minimum and the kernel's shortcut does not hold."""
    x = 3 * torch.randn(rows, k + 16, generator=torch.Generator().manual_seed(k)) + offset
    x[1] = offset
    x[2] = torch.linspace(-0.75, 0.15, k + 16)
    return x.to(dtype).to(device)[:, :k]


def case_norm(k: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, float]:
    """A LayerNorm's (weight, bias, eps) over K columns: weights around 1, biases around 0, SAM's eps."""
    gen = torch.Generator().manual_seed(k + 1)
    weight, bias = 1 + 0.5 * torch.randn(k, generator=gen), 0.2 * torch.randn(k, generator=gen)
    return weight.to(dtype).to(device), bias.to(dtype).to(device), 1e-6


def magnitude(q: torch.Tensor) -> torch.Tensor:
    """e4m3 codes' magnitude bits as integers: neighbouring values of one sign differ by 1."""
    return (q.view(torch.uint8) & 0x7F).int()


def compare(x: torch.Tensor, gelu: bool, launch: tuple[int, int, int] = (0, 0, 0), norm: tuple | None = None) -> dict:
    """The kernel's codes and scales against `reference` on the same input, `norm` (weight, bias, eps) or None."""
    from samrepro.kernels import fp8_rows as fr

    q, s = fr.fp8_rows(x, gelu, LB, *(norm or (None, None, 1e-5)), *launch)
    q_ref, s_ref = fr.reference(x, gelu, LB, norm)
    codes, ref = q.float(), q_ref.float()
    differ = codes != ref
    # the interpreter's rounding faults: the reference's code is a power of two and the kernel's half of it; the
    # scaled value lies exactly halfway between the two codes; a subnormal code one step (2^-9) nearer zero
    y = x.float() if norm is None else torch.nn.functional.layer_norm(x.float(), x.shape[1:], *norm_fp32(norm))
    scaled = (torch.nn.functional.gelu(y) if gelu else y) / s_ref
    halved = (ref == 2 * codes) & (torch.log2(ref.abs()) % 1 == 0)
    tie = (scaled - ref).abs() == (scaled - codes).abs()
    truncated = (ref.abs() <= 2**-6) & (ref.abs() - codes.abs() == 2**-9) & (ref * codes >= 0)
    return {
        "shapes": [list(q.shape), list(s.shape)],
        "dtypes": [str(q.dtype), str(s.dtype)],
        "scale_max_rel": ((s - s_ref).abs() / s_ref).max().item(),
        "differ": differ.float().mean().item(),
        "differ_unexplained": (differ & ~halved & ~tie & ~truncated).sum().item(),
        "differ_over_one_code": (differ & ((magnitude(q) - magnitude(q_ref)).abs() > 1)).sum().item(),
        "finite": bool(torch.isfinite(codes).all()),
        "zero_row": {"codes_zero": bool((codes[1] == 0).all()), "scale": s[1, 0].item()},
    }


def norm_fp32(norm: tuple) -> tuple:
    weight, bias, eps = norm
    return weight.float(), bias.float(), eps


def run_case(name: str, device: str = "cpu", launch: tuple[int, int, int] = (0, 0, 0)) -> dict:
    rows, k, dtype, gelu, norm = CASES[name]
    x = case_input(rows, k, dtype, device, NORM_OFFSET if norm else 0.0)
    return compare(x, gelu, launch, case_norm(k, dtype, device) if norm else None)


def interpreter_checks() -> dict:
    """Run in the child under TRITON_INTERPRET=1."""
    from samrepro.kernels import fp8_rows as fr

    assert fr.INTERPRETED, "the child must run with TRITON_INTERPRET=1"
    res = {name: run_case(name) for name in CASES}
    x, norm = case_input(5, 72, torch.bfloat16), case_norm(72, torch.bfloat16)
    x_far = case_input(5, 72, torch.bfloat16, offset=NORM_OFFSET)
    launches = ((1, 16, 1), (4, 32, 2), (8, 128, 4))  # 72 columns: 4 chunks of 16 and part of a fifth; 2 + 1/4; 1
    res["launches"] = {f"{bm}x{bk}x{w}": compare(x, True, (bm, bk, w)) for bm, bk, w in launches}
    res["norm_launches"] = {f"{bm}x{bk}x{w}": compare(x_far, False, (bm, bk, w), norm) for bm, bk, w in launches}
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    op, rows = torch.ops.samrepro.fp8_rows.default, x.contiguous()
    res["opcheck"] = {}
    for args in ((rows, True, LB), (rows, False, LB, *norm)):
        res["opcheck"] |= {
            k: v for k, v in torch.library.opcheck(op, args, test_utils=checks).items() if v != "SUCCESS"
        }
    res["module_norm"] = module_norm_args()
    return res


def module_norm_args() -> dict:
    """What an `Fp8RowLinear` built with a LayerNorm hands the kernel: the norm's own eps and its parameters."""
    norm = nn.LayerNorm(32, eps=0.25)
    module = fp8_fused.Fp8RowLinear(nn.Linear(32, 16), False, Fp8Config(), norm=norm)
    shared = all(
        b.data_ptr() == p.data_ptr() for b, p in ((module.norm_weight, norm.weight), (module.norm_bias, norm.bias))
    )
    return {"eps": module.eps, "shares_parameters": shared, "repr": repr(module)}


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict:
    from tests.conftest import interpreted_child  # not at the top: this file also runs as the child's script

    return interpreted_child(__file__, tmp_path_factory)


def check_case(res: dict, rows: int, k: int, exact_codes: bool, norm: bool = False) -> None:
    assert res["shapes"] == [[rows, k], [rows, 1]] and res["dtypes"] == ["torch.float8_e4m3fn", "torch.float32"]
    assert res["scale_max_rel"] <= 1e-6 and res["finite"]
    if not norm:  # a LayerNorm maps the zero row to its bias
        assert res["zero_row"] == {"codes_zero": True, "scale": pytest.approx(LB / 448)}
    assert res["differ_unexplained"] == 0 and res["differ"] <= (0 if exact_codes else 0.05)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_in_interpreter(interp, case):
    rows, k, _, _, norm = CASES[case]
    check_case(interp[case], rows, k, exact_codes=False, norm=norm)


def test_launch_overrides_and_op_registration(interp):
    for res in interp["launches"].values():
        check_case(res, 5, 72, exact_codes=False)
    for res in interp["norm_launches"].values():
        check_case(res, 5, 72, exact_codes=False, norm=True)
    assert interp["opcheck"] == {}
    assert interp["module_norm"] == {
        "eps": 0.25,
        "shares_parameters": True,
        "repr": "Fp8RowLinear(in=32, out=16, gelu=False, norm=True)",
    }


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "k, gelu, norm, dtype, launch",
    [
        (5120, True, False, "bf16", None),
        (1280, False, False, "bf16", None),
        (1280, False, True, "bf16", None),
        (3072, True, False, "fp32", None),
        (5120, True, False, "bf16", (1, 8192, 8)),  # lin2's input read once, the row in registers
    ],
)
def test_kernel_compiles_for_sm90(k, gelu, norm, dtype, launch):
    """Triton compiles to a cubin without a GPU: catches what the interpreter lets through (globals, types).
    `launch` None: the default one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from samrepro.kernels import fp8_rows as fr

    kernel = fr._fp8_rows_fwd
    bm, bk, warps = launch or fr.default_launch(k, norm)
    consts = {"K": k, "GELU": gelu, "NORM": norm, "BLOCK_M": bm, "BLOCK_K": bk}
    types = {"x_ptr": f"*{dtype}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}"}
    types |= {"M": "i32", "stride_xm": "i32", "lb": "fp32", "eps": "fp32"}
    signature = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
    src = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in consts.items()})
    assert triton.compile(src, GPUTarget("cuda", 90, 32), {"num_warps": warps}).asm["cubin"]


def test_bad_inputs_raise_before_running():
    from samrepro.kernels.fp8_rows import MAX_K, fp8_rows

    rows, w = torch.zeros(4, 16), torch.ones(16)
    for x, lb, norm, match in (
        (torch.zeros(2, 3, 16), LB, (), "2-d"),
        (torch.zeros(4, 16, dtype=torch.int32), LB, (), "2-d"),
        (torch.zeros(2, MAX_K + 16), LB, (), "contiguous"),
        (torch.zeros(16, 4).t(), LB, (), "contiguous"),
        (rows, 0.0, (), "positive"),
        (rows, LB, (w, None), "both norm_weight and norm_bias"),
        (rows, LB, (w, torch.ones(8)), r"shape \(16,\)"),
        (rows, LB, (w, torch.ones(32)[::2]), "contiguous"),
    ):
        with pytest.raises(ValueError, match=match):
            fp8_rows(x, False, lb, *norm)


def test_needs_cuda_sm89_and_says_so(sam):
    assert PATCH.requires.min_capability == (8, 9) and PATCH.config_cls is Fp8Config and PATCH.changes_weights
    state = model_state(sam)
    with pytest.raises(PatchUnavailable, match="fp8_fused: needs device cuda"):
        PATCH.apply(sam)
    assert model_state(sam) == state


class ScaledLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward: the kernel's LayerNorm would not compute it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "part, make, match",
    [
        ("mlp.act", lambda dim: nn.GELU(approximate="tanh"), "nn.GELU"),
        ("norm2", lambda dim: nn.LayerNorm(8), "norm2 must be an affine"),
        ("norm2", lambda dim: nn.LayerNorm(dim, bias=False), "norm2 must be an affine"),
        ("norm2", lambda dim: nn.RMSNorm(dim), "norm2 must be an affine"),
        ("norm2", ScaledLayerNorm, "norm2 must be an affine"),
    ],
    ids=["tanh_gelu", "narrow_norm", "biasless_norm", "rms_norm", "layer_norm_subclass"],
)
def test_refuses_what_its_kernel_would_silently_replace(sam, part, make, match):
    """lin2's quantization computes the erf GELU and lin1's an affine LayerNorm over the channels: anything else
    (another activation, another norm or width) must be refused, not swapped for what the kernel computes."""
    parent, name = part.rsplit(".", 1) if "." in part else ("", part)
    block = sam.image_encoder.blocks[1]
    setattr(block.get_submodule(parent), name, make(block.mlp.lin1.in_features))
    state = model_state(sam)
    with pytest.raises(PatchError, match=match):
        fp8_fused.PATCH.apply_fn(sam, Fp8Config(), Undo())
    assert model_state(sam) == state


@pytest.mark.cuda
@pytest.mark.skipif(not SM89, reason="needs CUDA sm89+")
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_on_gpu(case):
    rows, k, _, gelu, norm = CASES[case]
    res = run_case(case, "cuda")
    if gelu or norm:  # Triton's erf and torch's, the norms' mean and rstd differ in the last bits: a code at a
        # rounding boundary may move one step
        assert res["differ"] <= 0.001 and res["differ_over_one_code"] == 0
        res["differ_unexplained"] = res["differ"] = 0
    check_case(res, rows, k, exact_codes=True, norm=norm)


@pytest.mark.cuda
@pytest.mark.skipif(not SM89, reason="needs CUDA sm89+")
@pytest.mark.parametrize("bf16", [False, True])
def test_modules_match_fp8_compile_and_undo_exactly(fp32_model, bf16):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)).cuda()
    sam = copy.deepcopy(fp32_model).cuda()
    state, layers = model_state(sam), COUNTERS.get("fp8_fused.layers", 0)
    with torch.no_grad():
        ref = sam.image_encoder(x)
        with apply_patches(sam, ["bf16", "fp8"] if bf16 else ["fp8"]):
            torchao = sam.image_encoder(x).float()
        with apply_patches(sam, ["bf16", "fp8_fused"] if bf16 else ["fp8_fused"]):
            blocks = sam.image_encoder.blocks
            assert all(type(b.mlp.act) is nn.Identity and b.mlp.lin2.gelu and not b.mlp.lin1.gelu for b in blocks)
            assert all(type(b.norm2) is nn.Identity and b.mlp.lin1.norm_weight is not None for b in blocks)
            assert COUNTERS["fp8_fused.layers"] == layers + 4 * len(blocks)
            out = sam.image_encoder(x)
            compiled = torch.compile(sam.image_encoder)(x)
            slot = "both take the slot 'encoder linear weights'"
            with pytest.raises(PatchError, match=f"fp8 cannot be stacked on fp8_fused: {slot}"):
                get_patch("fp8").apply(sam)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32) and torch.isfinite(out).all()
        noise = (out.float() - torchao).pow(2).mean() / torchao.pow(2).mean()
        assert 10 * torch.log10(1 / noise) >= 25, "fp8_fused and torchao's fp8 quantize the same way"
        assert torch.allclose(compiled.float(), out.float(), rtol=0.02, atol=0.02 * out.abs().max().item())
        assert model_state(sam) == state and tensors_equal(sam, fp32_model) == []
        assert torch.equal(sam.image_encoder(x), ref)


@pytest.mark.cuda
@pytest.mark.skipif(not SM89, reason="needs CUDA sm89+")
def test_linear_takes_inputs_of_any_layout():
    """The residual stream lin1 now reads can be strided in its channels (batch 1 after the patch embedding's
    permute, found by the hypothesis gate): the module makes the rows contiguous for the kernel."""
    torch.manual_seed(0)
    linear, norm = nn.Linear(64, 32).cuda(), nn.LayerNorm(64, eps=1e-6).cuda()
    module = fp8_fused.Fp8RowLinear(linear, False, Fp8Config(), norm=norm)
    x = torch.randn(1, 64, 8, 8, device="cuda").permute(0, 2, 3, 1)  # 1, 8, 8, 64 with channel stride 64
    assert x.stride(-1) != 1
    assert torch.equal(module(x), module(x.contiguous()))


@pytest.mark.cuda
@pytest.mark.skipif(not SM89, reason="needs CUDA sm89+")
@pytest.mark.parametrize("broken", ["gelu", "norm"])
def test_declared_gate_fails_when_gelu_or_norm_is_dropped(tiny_ref, device, monkeypatch, broken):
    """fp8_fused whose lin2 quantizes lin1's output without the GELU, or whose lin1 quantizes x without norm2: its
    own tolerance must catch it."""
    from samrepro.gates import accuracy_violations, patches_for
    from tests.conftest import make_samples

    if device != "cuda":
        pytest.skip("the gates run on the CPU in this run (--device cpu)")
    init = fp8_fused.Fp8RowLinear.__init__

    def broken_init(self, lin, gelu, cfg, norm=None):
        init(self, lin, gelu and broken != "gelu", cfg, None if broken == "norm" else norm)

    monkeypatch.setattr(fp8_fused.Fp8RowLinear, "__init__", broken_init)
    samples = make_samples(seed=3, batch_size=2, max_prompts=3, boxes=False, multi_point=False)
    violations, measured = accuracy_violations(tiny_ref, patches_for(["fp8_fused"]), samples)
    assert any(v.startswith("embedding_sqnr_db") for v in violations), f"{violations} (measured {measured})"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(interpreter_checks()))
