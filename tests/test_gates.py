"""Registry-driven equivalence gates: every registered patch is tested here automatically."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samrepro import get_patch, list_patches
from samrepro.gates import accuracy_violations, patches_for, undo_violations
from samrepro.patch import PatchError
from tests.conftest import make_samples

# Each example of `compile` recompiles the encoder (new batch size), so it gets fewer.
EXAMPLES = {"compile": 2}

batches = st.builds(
    make_samples,
    seed=st.integers(0, 2**31 - 1),
    batch_size=st.integers(1, 3),
    max_prompts=st.integers(1, 4),
    boxes=st.booleans(),
    multi_point=st.booleans(),
)


def require(name: str, device: str) -> None:
    reason = get_patch(name).unavailable_reason(device)
    if reason:
        pytest.skip(f"{name}: {reason}")


def available(device: str) -> list[str]:
    return [n for n in list_patches() if get_patch(n).can_run(device)]


@pytest.mark.parametrize("name", list_patches())
def test_within_declared_tolerance(name, device, tiny_ref):
    require(name, device)

    @settings(max_examples=EXAMPLES.get(name, 6))
    @given(samples=batches)
    def check(samples):
        violations, measured = accuracy_violations(tiny_ref, patches_for([name]), samples)
        assert not violations, f"{name}: {violations} (measured {measured})"

    check()


@pytest.mark.parametrize("name", list_patches())
def test_undo_is_exact(name, device, tiny_ref):
    require(name, device)
    sam = copy.deepcopy(tiny_ref)
    samples = make_samples(seed=7, batch_size=2, max_prompts=3, boxes=True, multi_point=False)
    assert undo_violations(sam, patches_for([name]), samples) == []


@pytest.mark.parametrize("name", list_patches())
def test_double_apply_raises(name, device, tiny_ref):
    require(name, device)
    sam = copy.deepcopy(tiny_ref)
    with get_patch(name).apply(sam):
        with pytest.raises(PatchError, match="already applied"):
            get_patch(name).apply(sam)


def test_all_available_composed_within_plan_tolerance(device, tiny_ref):
    names = available(device)
    samples = make_samples(seed=11, batch_size=2, max_prompts=4, boxes=False, multi_point=False)
    violations, measured = accuracy_violations(tiny_ref, patches_for(names), samples)
    assert not violations, f"{names}: {violations} (measured {measured})"


def test_all_available_composed_undo_exact(device, tiny_ref):
    samples = make_samples(seed=5, batch_size=1, max_prompts=2, boxes=True, multi_point=True)
    assert undo_violations(copy.deepcopy(tiny_ref), patches_for(available(device)), samples) == []
