"""Slots: two patches that take over the same part of the model cannot be stacked, whichever is applied first."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from torch import nn

from samrepro import plans
from samrepro.patch import EXACT, Patch, PatchConfig, PatchError
from samrepro.registry import get_patch, list_patches


@dataclass(frozen=True)
class NoConfig(PatchConfig):
    pass


class Model(nn.Module):
    """As much of a Sam as `Patch.apply` looks at."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Linear(2, 2)


def marker(name: str, slots: tuple[str, ...], fail: bool = False) -> Patch:
    """A patch that sets `image_encoder.<name>` (or raises half-way, with `fail`)."""

    def apply(sam, config, undo):
        undo.setattr(sam.image_encoder, name, True)
        if fail:
            raise RuntimeError("failed half-way")

    return Patch(name=name, summary=name, config_cls=NoConfig, apply_fn=apply, tolerance=EXACT, slots=slots)


def test_a_patch_whose_slot_is_taken_is_refused_until_the_holder_is_undone():
    sam = Model()
    first, second = marker("first", ("kernel",)), marker("second", ("weights", "kernel"))
    handle = first.apply(sam)
    with pytest.raises(PatchError, match="second cannot be stacked on first: both take the slot 'kernel'"):
        second.apply(sam)
    assert not hasattr(sam.image_encoder, "second")
    handle.undo()
    with second.apply(sam):
        assert sam.image_encoder.second
        with pytest.raises(PatchError, match="first cannot be stacked on second: both take the slot 'kernel'"):
            first.apply(sam)


def test_other_slots_stack_and_a_failed_apply_holds_none():
    sam = Model()
    with pytest.raises(RuntimeError, match="half-way"):
        marker("broken", ("kernel",), fail=True).apply(sam)
    with marker("kernel", ("kernel",)).apply(sam), marker("weights", ("weights",)).apply(sam):
        with marker("free", ()).apply(sam):
            assert sam.image_encoder.kernel and sam.image_encoder.weights and sam.image_encoder.free


def test_built_in_slots():
    holders: dict[str, list[str]] = {}
    for name in list_patches():
        for slot in get_patch(name).slots:
            holders.setdefault(slot, []).append(name)
    assert holders == {
        "encoder attention kernel": ["triton_attn", "flex_attn"],
        "encoder linear weights": ["gelu_epilogue", "int8_dynamic", "fp8", "fp8_fused", "sparse24"],
    }


@pytest.mark.parametrize("name", plans.available_plans())
def test_no_shipped_plan_stacks_two_patches_of_one_slot(name):
    plan = plans.load(plans.find_plan(name))
    for mode in plans.MODES:
        for step in plans.resolve(plan, mode, lambda names: None):
            slots = [slot for patch in step.patches for slot in get_patch(patch).slots]
            assert len(slots) == len(set(slots)), (name, mode, step.name, step.patches)
