"""An ablation before any step runs: inputs checked, the plan resolved into steps, the settings they share (the
results folder's plan.json) and each step's spec.

`samrepro ablate` (runner.py: one step after another) and `samrepro sweep` (sweep_run.py: steps as Ray tasks) both
start here, so a folder written by either resumes under the other: what a step measures is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samrepro import plans
from samrepro.checkpoints import cache_root
from samrepro.console import say
from samrepro.inputs import (
    UsageError,
    check_inputs,
    check_patches,
    resolve_data,
    resolve_weights,
    resolve_workload,
    unavailable,
    weights_digest,
)
from samrepro.plans import Plan, ResolvedStep
from samrepro.spec import INPUT_KEYS, StepSpec


@dataclass(frozen=True)
class Ablation:
    folder: Path
    plan: Plan
    steps: list[ResolvedStep]
    setup: dict[str, Any]  # plan.json, less the command that ran it


def default_results_dir(
    model: str, device: str, plan: str, mode: str, batch_size: int, workload: dict[str, Any] | None = None
) -> Path:
    """results/MODEL-DEVICE-PLAN-MODE-bsB for the points workload; AMG ends in -amg-ppsN (points per side), the
    interactive workload in -interactive."""
    name = workload["name"] if workload else "points"
    size = f"bs{batch_size}"
    if name == "amg":
        size = f"amg-pps{workload['points_per_side']}"
    elif name == "interactive":
        size = "interactive"
    return Path("results") / f"{model}-{device}-{plan}-{mode}-{size}"


def default_plan(device: str, workload: str = "points") -> str:
    if workload == "amg":
        return "amg"
    return "blog" if device.startswith("cuda") else "cpu"


def prepare(
    model: str,
    device: str,
    plan: str | Path | Plan | None = None,
    patches: list[str] | None = None,
    mode: str = "cumulative",
    batch_size: int | None = None,
    images: int = 32,
    prompts: int | None = None,
    weights: str | None = None,
    data: str = "synthetic",
    results_dir: Path | None = None,
    workload: str = "points",
    workload_options: dict[str, int] | None = None,
) -> Ablation:
    """Check and resolve everything `run_ablation` takes (its docstring says what each means); bad input raises
    UsageError or PlanError before anything is written."""
    check_inputs(model, device, mode, batch_size, images, prompts)
    work, batch_size = resolve_workload(workload, model, workload_options or {}, batch_size, prompts)
    if batch_size > images:  # padding a few images up to a large batch would time images that do not exist
        say(f"batch size {batch_size} > {images} images: running batches of {images}")
        batch_size = images
    if patches is not None:
        if plan is not None:
            raise UsageError("give a plan or a list of patches, not both")
        check_patches(patches, device, workload)
        plan = plans.adhoc(patches)
    weights = resolve_weights(model, weights)
    data = resolve_data(data)
    if not isinstance(plan, Plan):
        plan = plans.load(plans.find_plan(str(plan or default_plan(device, workload))))
    steps = plans.resolve(plan, mode, lambda names: unavailable(names, device, workload))
    folder = Path(results_dir or default_results_dir(model, device, plan.name, mode, batch_size, work))
    setup = {
        "plan": plan.to_dict(),
        "plan_hash": plan.hash(),
        "mode": mode,
        "model": model,
        "device": device,
        "batch_size": batch_size,
        "images": images,
        "prompts": prompts,
        "weights": weights,
        "weights_sha256": weights_digest(weights),  # resume reruns steps whose weights file changed
        "data": data,
        "workload": work,
    }
    setup["bounds_off"] = plan.bounds_apply(setup)  # None: the plan's step bounds were calibrated on this workload
    return Ablation(folder, plan, steps, setup)


def step_spec(folder: Path, step: ResolvedStep, setup: dict[str, Any], profile: bool) -> StepSpec:
    """What one step process is asked to run; its `key()` decides whether an existing result is kept."""
    return StepSpec(
        **{k: setup[k] for k in INPUT_KEYS},
        plan=setup["plan"]["name"],
        plan_hash=setup["plan_hash"],
        mode=setup["mode"],
        index=step.index,
        step=step.name,
        patches=list(step.patches),
        configs=step.configs,
        revisions=StepSpec.revisions_of(step.patches),
        **plans.tolerance_spec(step, setup["bounds_off"]),
        note=step.note,
        results_dir=str(folder.resolve()),
        cache_dir=str(cache_root()),
        profile=profile,
    )
