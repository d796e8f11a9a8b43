"""Registry-driven equivalence gates: every registered patch is tested here automatically."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samrepro import get_patch, list_patches
from samrepro.data import load_dataset
from samrepro.gates import TENSOR_MEASURES, accuracy_violations, patches_for, undo_violations
from samrepro.patch import PatchError
from tests.conftest import make_samples

# Each example of `compile` recompiles the encoder (a new model copy, a new batch size): ~1 min on 2 CPU cores.
EXAMPLES = {"compile": 1, "flex_attn": 3, "compile_decoder": 3}  # these two compile per new shape too
VALIDATION_BATCH = 8  # the validation subset's batch size


def batches(batch_size: st.SearchStrategy[int] | None = None) -> st.SearchStrategy:
    return st.builds(
        make_samples,
        seed=st.integers(0, 2**31 - 1),
        batch_size=batch_size or st.integers(1, 3),
        max_prompts=st.integers(1, 4),
        boxes=st.booleans(),
        multi_point=st.booleans(),
    )


# `compile`'s example at the validation subset's batch size: the encoder graph inductor compiles (and caches) once
# for both; a real compile at batch 1 runs in tests/test_compile.py
STRATEGIES = {"compile": batches(st.just(VALIDATION_BATCH))}


def require(name: str, device: str) -> None:
    reason = get_patch(name).unavailable_reason(device)
    if reason:
        pytest.skip(f"{name}: {reason}")


def require_points(name: str, device: str) -> None:
    """For the point-prompt accuracy tests: a patch only the automatic mask generator runs has nothing to measure
    here (its own tests and the AMG gate check it)."""
    require(name, device)
    reason = get_patch(name).workload_reason("points")
    if reason:
        pytest.skip(f"{name}: {reason}")


def available(device: str) -> list[str]:
    return [n for n in list_patches() if get_patch(n).can_run(device)]


def composable(device: str) -> list[str]:
    """The available patches in application order, less any whose slot one kept before holds (sparse24 after int8)."""
    names: list[str] = []
    held: set[str] = set()
    for name in available(device):
        slots = set(get_patch(name).slots)
        if not slots & held:
            names.append(name)
            held |= slots
    return names


@pytest.mark.parametrize("name", list_patches())
def test_within_declared_tolerance(name, device, tiny_ref):
    require_points(name, device)

    @settings(max_examples=EXAMPLES.get(name, 6))
    @given(samples=STRATEGIES.get(name, batches()))
    def check(samples):
        violations, measured = accuracy_violations(tiny_ref, patches_for([name]), samples, TENSOR_MEASURES)
        assert not violations, f"{name}: {violations} (measured {measured})"

    check()


@pytest.fixture(scope="session")
def val_subset(tmp_path_factory):
    """The fixed validation subset: 48 held-out synthetic images, one center point per object (~250 prompts)."""
    samples, _ = load_dataset("synthetic", 48, tmp_path_factory.mktemp("data"))
    return samples


@pytest.mark.parametrize("name", list_patches())
def test_validation_subset_within_tolerance(name, device, tiny_ref, val_subset):
    """All four measures, GT mIoU drop and mask agreement included, pooled over the fixed subset."""
    require_points(name, device)
    violations, measured = accuracy_violations(tiny_ref, patches_for([name]), val_subset, batch_size=VALIDATION_BATCH)
    assert not violations, f"{name}: {violations} (measured {measured})"


@pytest.mark.parametrize("name", list_patches())
def test_undo_is_exact(name, device, tiny_ref):
    require(name, device)
    sam = copy.deepcopy(tiny_ref)
    # the validation subset's batch size: a compiling patch finds that shape's graph in inductor's cache
    samples = make_samples(seed=7, batch_size=VALIDATION_BATCH, max_prompts=3, boxes=True, multi_point=False)
    assert undo_violations(sam, patches_for([name]), samples) == []


@pytest.mark.parametrize("name", list_patches())
def test_double_apply_raises(name, device, tiny_ref):
    require(name, device)
    sam = copy.deepcopy(tiny_ref)
    with get_patch(name).apply(sam):
        with pytest.raises(PatchError, match="already applied"):
            get_patch(name).apply(sam)


def test_all_available_composed_within_plan_tolerance(device, tiny_ref, val_subset):
    names = composable(device)
    violations, measured = accuracy_violations(tiny_ref, patches_for(names), val_subset, batch_size=VALIDATION_BATCH)
    assert not violations, f"{names}: {violations} (measured {measured})"


def test_all_available_composed_undo_exact(device, tiny_ref):
    # the batch size of the test above: the compiled encoder's graph is the one inductor compiled (and cached) there
    samples = make_samples(seed=5, batch_size=VALIDATION_BATCH, max_prompts=2, boxes=True, multi_point=True)
    assert undo_violations(copy.deepcopy(tiny_ref), patches_for(composable(device)), samples) == []
