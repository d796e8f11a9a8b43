"""The patch contract and registry: names, errors, ordering, configs, tolerances."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

import samrepro
from samrepro import registry
from samrepro.patch import PatchConfig, PatchError, PatchUnavailable, Requires, Tolerance
from samrepro.registry import PATCH_ORDER, apply_patches, get_patch, list_patches, ordered, register_patch


def test_registry_lists_every_built_in_patch_with_tolerances():
    assert samrepro.list_patches() == list(PATCH_ORDER)
    for name in samrepro.list_patches():
        patch = samrepro.get_patch(name)
        assert isinstance(patch.tolerance, Tolerance) and patch.summary


def test_excludes_are_symmetric():
    """`Patch.apply` checks only the new patch's list, so each side must list the other (else order decides)."""
    one_sided = [
        (name, other)
        for name in list_patches()
        for other in get_patch(name).excludes
        if other not in list_patches() or name not in get_patch(other).excludes
    ]
    assert not one_sided


def test_unknown_patch_lists_valid_names():
    with pytest.raises(KeyError, match="valid: .*sync_free"):
        get_patch("nope")


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is now, restored after the test: outside registrations stay in the test."""
    monkeypatch.setattr(registry, "_PATCHES", dict(registry._PATCHES))
    monkeypatch.setattr(registry, "_ORDER", list(registry._ORDER))


def test_duplicate_registration_refused(scratch_registry):
    with pytest.raises(PatchError, match="already registered"):
        register_patch(get_patch("sync_free"))


def test_outside_patches_take_the_place_they_ask_for(scratch_registry):
    def outside(name: str):
        stray = copy.copy(get_patch("sync_free"))
        object.__setattr__(stray, "name", name)
        return stray

    register_patch(outside("mine"))  # default: just before compile, which wraps what the others change
    register_patch(outside("early"), before="bf16")
    names = list_patches()
    assert names.index("mine") == names.index("compile") - 1 and names[0] == "early"
    assert ordered(["compile", "mine", "early"]) == ["early", "mine", "compile"]
    with pytest.raises(PatchError, match="before unknown patch 'nope'"):
        register_patch(outside("lost"), before="nope")


def test_list_patches_filters_with_wildcards():
    assert list_patches("sync*") == ["sync_free"]
    assert list_patches() == [n for n in PATCH_ORDER if n in list_patches()]


def test_ordered_follows_patch_order_and_rejects_duplicates():
    assert ordered(["compile", "sync_free"]) == ["sync_free", "compile"]
    with pytest.raises(PatchError, match="twice"):
        ordered(["sync_free", "sync_free"])


def test_requirements_give_reasons():
    assert Requires(devices=("cuda",)).unmet("cpu") == "needs device cuda, got cpu"
    assert "needs the package" in Requires(packages=("no_such_pkg_xyz",)).unmet("cpu")
    assert Requires().unmet("cpu") is None
    if not torch.cuda.is_available():
        assert "is_available() is False" in Requires().unmet("cuda")


def test_unavailable_patch_raises_with_reason(tiny_ref):
    patch = copy.copy(get_patch("sync_free"))
    object.__setattr__(patch, "requires", Requires(devices=("cuda",)))
    with pytest.raises(PatchUnavailable, match="needs device cuda"):
        patch.apply(copy.deepcopy(tiny_ref))


def test_config_round_trip_and_unknown_keys():
    @dataclass(frozen=True)
    class Cfg(PatchConfig):
        mode: str = "a"

    assert Cfg.from_dict(Cfg(mode="b").to_dict()) == Cfg(mode="b")
    with pytest.raises(ValueError, match="unknown option"):
        Cfg.from_dict({"mdoe": "b"})


def test_apply_patches_rejects_configs_for_unlisted_patches(tiny_ref):
    with pytest.raises(PatchError, match="not in the list"):
        apply_patches(copy.deepcopy(tiny_ref), ["sync_free"], {"compile": {}})


def test_handle_undo_twice_raises(tiny_ref):
    handle = apply_patches(copy.deepcopy(tiny_ref), ["sync_free"])
    handle.undo()
    with pytest.raises(PatchError, match="already undone"):
        handle.undo()


def test_tolerance_composition_adds_errors():
    a = Tolerance(agreement_miou_min=0.99, gt_miou_drop_max=0.01, embedding_sqnr_min_db=30, iou_pred_max_abs=0.01)
    both = a.compose(a)
    assert both.agreement_miou_min == pytest.approx(0.98)
    assert both.gt_miou_drop_max == pytest.approx(0.02)
    assert both.embedding_sqnr_min_db == pytest.approx(30 - 10 * math.log10(2))
    assert Tolerance().compose(Tolerance()).embedding_sqnr_min_db == math.inf
    with pytest.raises(ValueError):
        Tolerance(agreement_miou_min=1.5)


def test_plan_bounds_tighten_and_never_loosen():
    declared = Tolerance(
        agreement_miou_min=0.93, gt_miou_drop_max=0.02, embedding_sqnr_min_db=35, iou_pred_max_abs=0.05
    )
    tighter = declared.tighten({"agreement_miou_min": 0.98, "iou_pred_max_abs": 0.01})
    assert tighter == Tolerance(
        agreement_miou_min=0.98, gt_miou_drop_max=0.02, embedding_sqnr_min_db=35, iou_pred_max_abs=0.01
    )
    looser = {"agreement_miou_min": 0.5, "gt_miou_drop_max": 0.5, "embedding_sqnr_min_db": 1.0, "iou_pred_max_abs": 1.0}
    assert declared.tighten(looser) == declared
