"""Plans as data: parsing, validation messages, and the patch set each step runs in either mode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from samrepro import plans
from samrepro.plans import PlanError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


GOOD = """
name = "demo"
description = "a demo"

[[steps]]
name = "fp32"

[[steps]]
name = "a"
add = ["a"]
[steps.config.a]
level = 2

[[steps]]
name = "b"
add = ["b"]
base = ["a"]
[steps.tolerance]
agreement_miou_min = 0.5

[[steps]]
name = "c"
add = ["c"]
remove = ["b"]
"""


def test_shipped_plans_parse():
    blog = plans.load(plans.find_plan("blog"))
    assert [s.name for s in blog.steps] == [
        "fp32", "bf16", "sync_free", "compile", "sdpa", "triton_attn", "batched_decoder", "int8_dynamic", "sparse24"
    ]  # fmt: skip
    assert blog.steps[3].config == {"compile": {"mode": "max-autotune"}}
    assert blog.steps[-1].remove == ("int8_dynamic",)
    cpu = plans.load(plans.find_plan("cpu"))
    assert [s.name for s in cpu.steps] == ["fp32", "bf16", "sdpa", "compile"]


def test_good_plan_and_hash(tmp_path):
    plan = plans.load(write(tmp_path, GOOD))
    assert plan.name == "demo" and plan.steps[1].config == {"a": {"level": 2}}
    assert plan.steps[2].tolerance == {"agreement_miou_min": 0.5}
    same = plans.load(write(tmp_path, GOOD.replace('name = "demo"', 'name="demo"')))
    assert plan.hash() == same.hash() and len(plan.hash()) == 64  # formatting does not matter
    changed = plans.load(write(tmp_path, GOOD.replace("level = 2", "level = 3")))
    assert changed.hash() != plan.hash()


def test_cumulative_and_isolated_sets(tmp_path):
    plan = plans.load(write(tmp_path, GOOD))
    cum = plans.resolve(plan, "cumulative", lambda names: None)
    assert [s.patches for s in cum] == [(), ("a",), ("a", "b"), ("a", "c")]  # c replaces b
    assert cum[2].configs == {"a": {"level": 2}} and cum[2].tolerance == {"agreement_miou_min": 0.5}
    iso = plans.resolve(plan, "isolated", lambda names: None)
    assert [s.patches for s in iso] == [(), ("a",), ("a", "b"), ("c",)]  # own add on top of its base
    assert iso[3].configs == {} and all(s.skip_reason is None for s in iso)


def test_unrunnable_patches_are_skipped_with_reason(tmp_path):
    plan = plans.load(write(tmp_path, GOOD))
    missing = {"b": "not registered"}

    def unavailable(names):
        return "; ".join(missing[n] for n in names if n in missing) or None

    cum = plans.resolve(plan, "cumulative", unavailable)
    assert [s.skip_reason for s in cum] == [None, None, "not registered", None]
    assert cum[3].patches == ("a", "c")  # b never ran, so removing it changes nothing
    iso = plans.resolve(plan, "isolated", unavailable)
    assert [s.skip_reason for s in iso] == [None, None, "not registered", None]
    missing = {"a": "needs cuda"}
    cum = plans.resolve(plan, "cumulative", unavailable)
    assert cum[1].skip_reason == "needs cuda"
    assert cum[2].patches == ("b",) and cum[2].note == "runs without a (skipped earlier)"


def test_registry_reasons():
    from samrepro.inputs import unavailable

    assert "not registered" in unavailable(["no_such_patch"], "cpu")
    assert "sync_free" in unavailable(["no_such_patch"], "cpu")  # lists the registered ones
    assert unavailable(["sync_free"], "cpu") is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: "color = 1\n" + t, "unknown top-level field(s) ['color']"),
        (lambda t: t.replace('add = ["a"]', 'add = ["a"]\nadds = ["x"]'), "steps[1]: unknown key(s) ['adds']"),
        (lambda t: t.replace('name = "b"', 'name = "a"'), "step 'a': duplicate step name"),
        (lambda t: t.replace('remove = ["b"]', 'remove = ["z"]'), "step 'c'.remove: ['z'] never added"),
        (lambda t: t.replace("[steps.config.a]", "[steps.config.q]"), "step 'a'.config: config for patch(es) ['q']"),
        (lambda t: t.replace("agreement_miou_min", "agreement"), "step 'b'.tolerance: unknown key(s) ['agreement']"),
        (lambda t: t.replace("0.5", "1.5"), "step 'b'.tolerance: agreement_miou_min must be in [0, 1]"),
        (lambda t: t.replace('name = "fp32"', 'name = "fp32"\nadd = ["a"]'), "first step is the fp32 baseline"),
        (lambda t: t.replace('add = ["c"]', 'add = "c"'), "step 'c'.add: must be a list"),
        (lambda t: t.replace('name = "demo"', ""), "missing required key 'name'"),
        (lambda t: t.replace('name = "c"', 'name = "c/d"'), "must be letters, digits"),
        (lambda t: t + "[[", "not valid TOML"),
    ],
)
def test_bad_plans_name_file_and_key(tmp_path, edit, message):
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(PlanError) as err:
        plans.load(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_cumulative_add_twice_and_unknown_plan(tmp_path):
    plan = plans.load(write(tmp_path, GOOD.replace('add = ["c"]', 'add = ["a"]')))
    assert plans.resolve(plan, "isolated", lambda names: None)[3].patches == ("a",)  # fine in isolation
    with pytest.raises(PlanError, match=r"step 'c'.add: \['a'\] already active"):
        plans.resolve(plan, "cumulative", lambda names: None)
    with pytest.raises(PlanError, match="unknown plan 'nope'; valid: .*blog"):
        plans.find_plan("nope")


def test_adhoc_plan_from_patch_names():
    plan = plans.adhoc(["bf16", "sdpa"])
    assert plan.name == "patches-bf16+sdpa" and [s.name for s in plan.steps] == ["fp32", "bf16", "sdpa"]
    cum = plans.resolve(plan, "cumulative", lambda names: None)
    assert [s.patches for s in cum] == [(), ("bf16",), ("bf16", "sdpa")]
    assert [s.patches for s in plans.resolve(plan, "isolated", lambda names: None)] == [(), ("bf16",), ("sdpa",)]


def test_unreadable_plan_file(tmp_path):
    path = write(tmp_path, "")
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(PlanError, match=f"{path}: cannot read the plan: .*utf-8"):
        plans.load(path)


CALIBRATED = """
[calibrated]
models = ["vit_b", "vit_h"]
data = "noise:8"
batch_size = 16
weights = "random"
evidence = "reports/somewhere"
"""
RUN = {"model": "vit_b", "data": "noise:8", "batch_size": 16, "weights": "random"}


def test_plan_bounds_apply_only_on_the_calibrated_workload(tmp_path):
    plan = plans.load(write(tmp_path, GOOD + CALIBRATED))
    assert plan.bounds_apply(RUN) is None
    assert plan.bounds_apply(RUN | {"model": "vit_h"}) is None
    assert (
        plan.bounds_apply(RUN | {"model": "tiny"})
        == "plan bounds were calibrated on models ['vit_b', 'vit_h'], this run has tiny"
    )
    assert (
        plan.bounds_apply(RUN | {"data": "synthetic"})
        == "plan bounds were calibrated on data noise:8, this run has synthetic"
    )
    assert "batch_size 16, this run has 8" in plan.bounds_apply(RUN | {"batch_size": 8})
    assert plans.load(write(tmp_path, GOOD)).bounds_apply(RUN | {"model": "tiny"}) is None  # no table: the plan's claim
    assert plan.to_dict()["calibrated"]["data"] == "noise:8"  # part of the hash
    assert plan.hash() != plans.load(write(tmp_path, GOOD)).hash()


def test_runner_gates_with_the_plan_bound_only_where_it_holds(tmp_path):

    plan = plans.load(write(tmp_path, GOOD + CALIBRATED))
    step = plans.resolve(plan, "cumulative", lambda names: None)[2]
    here = plans.tolerance_spec(step, plan.bounds_apply(RUN))
    assert here == {
        "tolerance": {"agreement_miou_min": 0.5},
        "tolerance_source": "declared, tightened by the plan: agreement_miou_min=0.5",
    }
    elsewhere = plans.tolerance_spec(step, plan.bounds_apply(RUN | {"data": "synthetic"}))
    assert elsewhere["tolerance"] == {}
    assert elsewhere["tolerance_source"].startswith(
        "declared; plan bound agreement_miou_min=0.5 not applied: plan bounds"
    )


def test_every_shipped_plan_bound_names_where_it_was_calibrated():
    for name in plans.available_plans():
        plan = plans.load(plans.find_plan(name))
        if any(s.tolerance for s in plan.steps):
            assert {"data", "batch_size", "weights", "evidence"} <= set(plan.calibrated), name
            for folder in plan.calibrated["evidence"].split(", "):
                assert (Path(__file__).resolve().parents[1] / folder).is_dir(), (name, folder)


@pytest.mark.parametrize(
    "table, message",
    [
        ('[calibrated]\nplace = "x"', "calibrated: unknown key(s) ['place']"),
        ("[calibrated]\nbatch_size = 1.5", "calibrated.batch_size: must be an integer"),
        ('[calibrated]\nmodels = "vit_b"', "calibrated.models: must be a list"),
    ],
)
def test_bad_calibrated_tables(tmp_path, table, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        plans.load(write(tmp_path, GOOD + table))


@pytest.mark.parametrize("name", plans.available_plans())
def test_every_shipped_plan_names_registered_patches_with_valid_configs(name):
    from samrepro.inputs import config_error
    from samrepro.registry import list_patches

    plan = plans.load(plans.find_plan(name))
    registered = set(list_patches())
    for mode in plans.MODES:
        for step in plans.resolve(plan, mode, lambda names: None):
            assert set(step.patches) <= registered, (name, step.name)
            assert config_error(step) is None, (name, step.name)
