"""The patch contract and registry: names, errors, ordering, configs, tolerances."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

import samrepro
from samrepro.patch import PatchConfig, PatchError, PatchUnavailable, Requires, Tolerance
from samrepro.registry import PATCH_ORDER, apply_patches, get_patch, list_patches, ordered, register_patch

EXPECTED = {
    *("bf16", "sync_free", "compile", "sdpa", "triton_attn", "batched_decoder"),
    *("int8_dynamic", "fp8", "sparse24", "flex_attn"),
}


def test_registry_lists_the_issue_patches_with_tolerances():
    assert EXPECTED <= set(samrepro.list_patches())
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


def test_duplicate_and_unordered_registration_refused():
    with pytest.raises(PatchError, match="already registered"):
        register_patch(get_patch("sync_free"))
    stray = copy.copy(get_patch("sync_free"))
    object.__setattr__(stray, "name", "stray")
    with pytest.raises(PatchError, match="PATCH_ORDER"):
        register_patch(stray)


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
