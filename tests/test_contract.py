"""The patch contract and registry: names, errors, ordering, configs, tolerances."""

from __future__ import annotations

import ast
import copy
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import samrepro
from samrepro import registry
from samrepro.patch import PatchConfig, PatchError, PatchUnavailable, Requires, Tolerance
from samrepro.registry import PATCH_ORDER, apply_patches, get_patch, list_patches, ordered, register_patch


def test_every_patch_file_is_imported_ordered_and_registered():
    """Each file of src/samrepro/patches/ (helpers start with '_') is imported by the package, which registers it,
    and has its place in PATCH_ORDER: a patch missing from either would escape every test parametrized over the
    registry."""
    package = Path(samrepro.patches.__file__).parent
    files = sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_"))
    init = ast.parse((package / "__init__.py").read_text(encoding="utf-8"))
    imports = [alias.name for node in init.body if isinstance(node, ast.Import) for alias in node.names]
    imported = sorted(name.rsplit(".", 1)[-1] for name in imports)
    assert files == imported == sorted(PATCH_ORDER)
    assert list_patches() == list(PATCH_ORDER)
    assert all(importlib.import_module(f"samrepro.patches.{name}").PATCH is get_patch(name) for name in files)


@pytest.mark.parametrize("name", list_patches())
def test_every_patch_declares_the_contract(name):
    """Name, summary, tolerances, requirements, and a default config that survives the dict round trip plans use."""
    patch = get_patch(name)
    assert patch.name == name and patch.summary.strip()
    assert isinstance(patch.tolerance, Tolerance) and isinstance(patch.reference_tolerance, Tolerance)
    assert isinstance(patch.requires, Requires) and issubclass(patch.config_cls, PatchConfig)
    config = patch.config_cls()
    assert patch.config_cls.from_dict(config.to_dict()) == config
    if patch.reference_config is not None:  # the same weight change made plainly: only for weight-changing patches
        assert patch.changes_weights and isinstance(patch.config_cls.from_dict(patch.reference_config), PatchConfig)


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
    # the AMG bounds keep the declared agreement's: a point-prompt bound says nothing of AMG
    assert tighter == Tolerance(
        agreement_miou_min=0.98, gt_miou_drop_max=0.02, embedding_sqnr_min_db=35, iou_pred_max_abs=0.01,
        amg_matched_miou_min=declared.amg_matched_miou_min, amg_match_share_min=declared.amg_match_share_min,
    )  # fmt: skip
    looser = {"agreement_miou_min": 0.5, "gt_miou_drop_max": 0.5, "embedding_sqnr_min_db": 1.0, "iou_pred_max_abs": 1.0}
    assert declared.tighten(looser) == declared
