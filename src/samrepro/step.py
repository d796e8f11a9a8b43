"""One ablation step in a fresh process: `python -m samrepro.step SPEC_JSON_PATH` writes its StepResult JSON.

The spec (written by the runner) names the model, device, data, workload, patches and their configs; the fp32
baseline step also stores what its workload is compared on (workloads.py) in BASELINE for the later steps.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

import samrepro
from samrepro import bench, env, gates, results
from samrepro.amg_compare import ungated
from samrepro.console import emit
from samrepro.kernels import COUNTERS
from samrepro.models import fp32_reference_mode, load_model
from samrepro.patch import Tolerance
from samrepro.registry import apply_patches, get_patch, ordered
from samrepro.results import StepResult, utc_now
from samrepro.spec import POINTS_WORKLOAD, StepSpec
from samrepro.workload import Sample
from samrepro.workloads import AMG, WORKLOADS

BASELINE = "baseline.pt"
INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"  # every step of every run on this machine shares it (yours wins if set)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m samrepro.step SPEC_JSON_PATH", file=sys.stderr)
        return 2
    spec = StepSpec.read(Path(args[0]))
    os.environ[INDUCTOR_CACHE] = samrepro.USER_INDUCTOR_CACHE or str(
        env.inductor_cache(Path(spec.cache_dir), spec.device)
    )
    result = spec.result(started_at=utc_now())
    code = 0
    try:
        run(spec, result)
        result.status = "ok"
    except Exception as e:  # recorded in the result; the sweep goes on
        traceback.print_exc()
        result.status, result.gate = "failed", "skipped"
        result.reason = f"{type(e).__name__}: {e}".splitlines()[0]
        result.error = traceback.format_exc()
        code = 1
    result.finished_at = utc_now()
    results.write(result, Path(spec.results_dir))
    return code


def run(spec: StepSpec, result: StepResult) -> None:
    """Load, patch, run the spec's workload, compare with the baseline and gate; fills `result` in place."""
    from samrepro import data  # written alongside; imported late so a missing loader fails this step only

    folder = Path(spec.results_dir)
    work = WORKLOADS[spec.workload["name"]]
    patches = [get_patch(name) for name in ordered(spec.patches)]
    result.patches = [p.name for p in patches]
    result.configs = {  # every field, defaults included
        p.name: p.config_cls.from_dict(spec.configs.get(p.name, {})).to_dict() for p in patches
    }
    result.changes_weights = any(p.changes_weights for p in patches)
    emit("loading")
    samples, data_label = data.load_dataset(spec.data, spec.images, Path(spec.cache_dir))
    samples = limit_prompts(samples, spec.prompts)
    sam = load_model(spec.model, spec.device, spec.weights)
    result.weights = sam.weights_label
    fp32_reference_mode()
    emit("patching")
    apply_patches(sam, result.patches, spec.configs)  # never undone: the process ends with the step
    result.env = env.capture() | {"data": data_label, "inductor_cache": os.environ[INDUCTOR_CACHE]}

    emit("compiling" if any(get_patch(n).compiles for n in result.patches) else "warming")
    out = work.measure(sam, spec, samples, timing, bench.WARMUP_RUNS)
    result.env["memory_source"] = out.memory_source
    work.record(result, out, spec)
    result.kernel_paths = dict(COUNTERS)  # which hand-written kernel paths ran (triton_attn counts its calls)

    emit("gating")
    if spec.index == 0:
        save_baseline(folder / BASELINE, out, spec.inputs())
        result.gate, result.reason = "skipped", "reference step"
    else:
        gate(result, out, folder / BASELINE, spec, same_change_reference(spec, result.patches, samples))

    if spec.profile:
        stem = folder / "traces" / result.filename().removesuffix(".json")
        result.env["profile"] = profile(sam, spec, samples, stem)


def timing(done: int, total: int) -> None:
    emit("timing", done=done, total=total)


def profile(sam: Sam, spec: StepSpec, samples: list[Sample], stem: Path) -> str:
    """A trace (and on GPU a memory snapshot) of one more run; a failure here keeps the measured result."""
    snapshot = Path(f"{stem}.memory.pickle") if sam.device.type == "cuda" else None
    if snapshot is not None and "compile" in spec.patches:
        snapshot = None  # CUDA graphs (max-autotune) and the memory recorder do not mix
    try:
        work = WORKLOADS[spec.workload["name"]]
        work.profile(sam, spec, samples, Path(f"{stem}.trace.json.gz"), Path(f"{stem}.ops.txt"), snapshot)
    except Exception as e:
        traceback.print_exc()
        return f"failed: {type(e).__name__}: {e}"
    return "trace + ops table" + (" + memory snapshot" if snapshot else "")


def same_change_reference(spec: StepSpec, names: list[str], samples: list[Sample]) -> SameChange | None:
    """With random weights, the outputs of fp32 with the step's weight change made in plain arithmetic (the
    weight-changing patch's reference config); None where the step is gated against the fp32 step as it is."""
    changing = [get_patch(n) for n in names if get_patch(n).reference_config is not None]
    if spec.weights != "random" or not changing:
        return None
    (patch,) = changing  # weight-changing patches exclude each other
    emit("reference")
    ref = load_model(spec.model, spec.device, spec.weights)
    apply_patches(ref, [patch.name], {patch.name: patch.reference_config})
    work = WORKLOADS[spec.workload["name"]]
    return SameChange(patch.name, patch.reference_config, work.outputs(work.measure(ref, spec, samples, None, 0)))


@dataclasses.dataclass
class SameChange:
    """fp32 with one patch's weight change and nothing else: what a random-weight step is gated against."""

    patch: str
    config: dict[str, Any]
    outputs: Any  # the workload's outputs (compare.Outputs, amg_compare.AmgOutputs)


def gate(
    result: StepResult,
    out: Any,
    baseline_path: Path,
    spec: StepSpec,
    same_change: SameChange | None = None,
) -> None:
    """The workload's measures of its run `out` against the fp32 step's (or, with `same_change`, against fp32 with
    the same weight change), checked by the gate the equivalence tests use."""
    work = WORKLOADS[spec.workload["name"]]
    patches = [get_patch(name) for name in result.patches]
    tol = gates.plan_tolerance(patches, spec.tolerance)
    result.tolerance, result.tolerance_source = shown(tol, work.tolerance_keys), spec.tolerance_source
    if not baseline_path.is_file():
        result.gate, result.reason = "skipped", f"no fp32 baseline ({baseline_path.name}): the first step did not run"
        return
    state = torch.load(baseline_path, weights_only=True)
    if {"workload": POINTS_WORKLOAD} | state["inputs"] != spec.inputs():  # older baselines name no workload
        raise RuntimeError(f"{baseline_path} was measured with other settings: {state['inputs']}")
    mine = work.outputs(out)
    measured = work.deviation(work.from_state(state), mine)
    plainly = None
    if same_change:
        unchanged, measured = measured, work.deviation(same_change.outputs, mine)
        plainly = same_change.patch
        agreement = unchanged.get("miou_agreement", unchanged.get("amg_matched_miou"))
        result.tolerance_source = (
            f"random weights: against fp32 with {plainly}'s weight change made plainly "
            f"({same_change.config}), as its declared tolerance holds for trained weights; "
            f"against fp32 as it is: agreement {_fmt(agreement, '.3f')}, "
            f"SQNR {_fmt(unchanged['embedding_sqnr_db'], '.1f')} dB"
        )
    tol, result.gate_violations = gates.check(measured, patches, spec.tolerance, plainly)
    result.tolerance = shown(tol, work.tolerance_keys)
    result.embedding_sqnr_db = measured["embedding_sqnr_db"]
    result.miou_agreement = measured.get("miou_agreement")
    result.amg_matched_miou = measured.get("amg_matched_miou")
    result.amg_match_share = measured.get("amg_match_share")
    result.amg_mask_count_diff = measured.get("amg_mask_count_diff")
    result.amg_fp32_masks = measured.get("amg_fp32_masks")
    if work.name == AMG:
        lost = ungated(measured, len(mine.masks))
        if lost:
            result.reason = f"{result.reason}; {lost}" if result.reason else lost
    result.gate = "fail" if result.gate_violations else "pass"


def shown(tol: Tolerance, keys: tuple[str, ...]) -> dict[str, float]:
    """The bounds a workload's gate checks, as the StepResult records them."""
    return {k: v for k, v in tol.to_dict().items() if k in keys}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def save_baseline(path: Path, out: Any, inputs: dict[str, Any]) -> None:
    """The fp32 step's run `out`, reduced to what its workload is compared on, with the inputs it was measured on."""
    state = {"inputs": inputs, **WORKLOADS[inputs["workload"]["name"]].outputs(out).state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def limit_prompts(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most `limit` prompts (and their ground truth) per image."""
    if limit is None:
        return samples

    def cut(a):
        return None if a is None else a[:limit]

    return [
        dataclasses.replace(s, points=cut(s.points), labels=cut(s.labels), boxes=cut(s.boxes), gt_masks=cut(s.gt_masks))
        for s in samples
    ]


if __name__ == "__main__":
    sys.exit(main())
