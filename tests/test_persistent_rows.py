"""compile's persistent_rows: row reductions up to the limit run in one pass (its scoping: tests/test_compile.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

from samrepro.patches._persistent import INDUCTOR_LIMIT, PersistentRows
from samrepro.patches.compile import CHOICES, CompileConfig, _scoped_call

VIT_H_WIDTH = 1280  # vit_h's channels: its LayerNorm rows


def features(numel: int, hint: ReductionHint = ReductionHint.INNER) -> SimpleNamespace:
    """What inductor's heuristics read of a kernel: its reduction's length and kind."""
    return SimpleNamespace(reduction_numel=sympy.Integer(numel), get_reduction_hint=lambda: hint, numel=65536)


@pytest.mark.parametrize(
    "numel, hint, inductor, raised",
    [
        (768, ReductionHint.INNER, True, True),  # vit_b's rows: persistent already
        (VIT_H_WIDTH, ReductionHint.INNER, False, True),
        (2048, ReductionHint.INNER, False, True),
        (4096, ReductionHint.INNER, False, False),  # past the raised limit: inductor's own answer
        (VIT_H_WIDTH, ReductionHint.OUTER, False, False),  # column reductions are left to inductor
    ],
)
def test_rows_up_to_the_limit_run_persistent(numel, hint, inductor, raised):
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        assert InductorChoices.should_use_persistent_reduction(features(numel, hint), False) is inductor
        assert PersistentRows(2048).should_use_persistent_reduction(features(numel, hint), False) is raised


@pytest.mark.parametrize("rows", [512, 1024.0, True])
def test_config_rejects_limits_below_inductors_or_not_int(rows):
    with pytest.raises(ValueError, match="persistent_rows must be an int"):
        CompileConfig(persistent_rows=rows)


def test_the_choices_knob_is_compiles_own():
    with pytest.raises(ValueError, match="compile's own"):
        CompileConfig(inductor_options={CHOICES: None})
    assert CHOICES not in CompileConfig().inductor_patch()  # inductor's limit: nothing to change


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows, persistent", [(INDUCTOR_LIMIT, False), (2048, True)])
def test_vit_h_layernorm_compiles_to_one_pass(rows, persistent):
    """The add + LayerNorm of vit_h's width: a looped reduction under inductor's limit, persistent above it."""
    torch._dynamo.reset()
    x, y = torch.randn(2, 4096, VIT_H_WIDTH, device="cuda", dtype=torch.bfloat16)

    def add_norm(a, b):
        return F.layer_norm(a + b, (VIT_H_WIDTH,))

    compiled = _scoped_call(torch.compile(add_norm), CompileConfig(persistent_rows=rows).inductor_patch(), False)
    out, (code, *_) = run_and_get_code(compiled, x, y)
    torch.testing.assert_close(out, add_norm(x, y), atol=2e-2, rtol=2e-2)
    assert ("@triton_heuristics.persistent_reduction" in code) is persistent, code
    torch._dynamo.reset()
