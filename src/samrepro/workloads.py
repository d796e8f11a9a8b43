"""What a step can time (`samrepro ablate --workload`): for each workload, its settings, how it is measured, what of
it the StepResult records, how it is compared with the fp32 step, and which bounds its gate checks. step.py runs
whichever one the spec names; a new workload is one more entry in WORKLOADS (and its options on the command line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segment_anything.modeling import Sam

from samrepro import amg, bench, flops, interactive
from samrepro.amg_compare import AmgOutputs
from samrepro.amg_compare import deviation as amg_deviation
from samrepro.compare import Outputs, deviation
from samrepro.results import StepResult
from samrepro.spec import StepSpec
from samrepro.workload import Sample

POINTS, AMG, INTERACTIVE = "points", "amg", "interactive"
# The bounds checked on prompted masks (points and interactive workloads)
PROMPT_MEASURES = ("agreement_miou_min", "gt_miou_drop_max", "embedding_sqnr_min_db", "iou_pred_max_abs")
Progress = Callable[[int, int], None] | None


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    # (model, spec, samples, progress, warm-up runs) -> the measured run
    measure: Callable[[Sam, StepSpec, list[Sample], Progress, int], Any]
    record: Callable[[StepResult, Any, StepSpec], None]  # speed and size into the result
    outputs: Callable[[Any], Any]  # the measured run -> what is compared (with .state() for the baseline file)
    from_state: Callable[[dict[str, Any]], Any]  # the fp32 step's baseline file -> the same
    deviation: Callable[[Any, Any], dict[str, float | None]]  # (fp32, this step) -> measures
    tolerance_keys: tuple[str, ...]  # the Tolerance fields its gate checks (what the StepResult shows)
    profile: Callable[[Sam, StepSpec, list[Sample], Path, Path, Path | None], None]  # one more run, profiled


def _measure_points(sam: Sam, spec: StepSpec, samples: list[Sample], progress: Progress, warmup: int) -> Any:
    return bench.run(sam, samples, spec.batch_size, progress=progress, warmup=warmup)


def _record_points(result: StepResult, out: bench.BenchResult, spec: StepSpec) -> None:
    result.images, result.prompts_per_image = out.images, out.prompts / out.images
    result.img_s, result.compile_s = out.img_s, out.compile_s
    result.latency_ms_p50, result.latency_ms_p90 = out.latency_pct(50), out.latency_pct(90)
    result.encoder_ms = out.encoder_ms
    encoded = -(-out.images // spec.batch_size) * spec.batch_size  # the last batch is padded
    result.encoder_tflop_s = flops.tflop_s(spec.model, encoded, out.encoder_s)
    result.peak_mem_mib, result.peak_mem_reserved_mib = out.peak_mem_mib, out.peak_mem_reserved_mib
    result.miou_gt = out.miou_gt


def _profile_points(sam: Sam, spec: StepSpec, samples: list[Sample], trace: Path, table: Path, snap: Path | None):
    bench.profile(sam, samples, spec.batch_size, trace, table, snap)


def _measure_amg(sam: Sam, spec: StepSpec, samples: list[Sample], progress: Progress, warmup: int) -> Any:
    return amg.run(sam, samples, generator_kwargs(spec.workload), progress=progress, warmup=warmup)


def _record_amg(result: StepResult, out: amg.AmgResult, spec: StepSpec) -> None:
    result.images, result.prompts_per_image = out.images, float(out.prompts_per_image)
    result.img_s, result.compile_s = out.img_s, out.compile_s
    result.latency_ms_p50, result.latency_ms_p90 = out.latency_pct(50), out.latency_pct(90)
    result.peak_mem_mib, result.peak_mem_reserved_mib = out.peak_mem_mib, out.peak_mem_reserved_mib
    result.amg_masks_per_image = out.masks_per_image


def _profile_amg(sam: Sam, spec: StepSpec, samples: list[Sample], trace: Path, table: Path, snap: Path | None):
    gen = amg.generator(sam, generator_kwargs(spec.workload))
    bench.profile_call(lambda: gen.generate(samples[0].image), sam.device, trace, table, snap)


def _measure_interactive(sam: Sam, spec: StepSpec, samples: list[Sample], progress: Progress, warmup: int) -> Any:
    return interactive.run(sam, samples, progress=progress, warmup=warmup)


def _record_interactive(result: StepResult, out: interactive.InteractiveResult, spec: StepSpec) -> None:
    clicks, stats = out.run, out.run.stats()
    result.images, result.prompts_per_image = out.images, stats["clicks"] / out.images
    result.img_s, result.compile_s = out.img_s, clicks.warmup_s
    result.latency_ms_p50, result.latency_ms_p90 = stats["first_mask_p50_ms"], stats["first_mask_p90_ms"]
    result.click_ms_p50, result.click_ms_p90 = stats["click_p50_ms"], stats["click_p90_ms"]
    result.encoder_ms = sum(clicks.encoder_ms) / out.images
    result.encoder_tflop_s = flops.tflop_s(spec.model, out.images, sum(clicks.encoder_ms) / 1e3)
    result.peak_mem_mib, result.peak_mem_reserved_mib = clicks.peak_mem_mib, clicks.peak_mem_reserved_mib
    result.miou_gt = out.miou_gt


def _profile_interactive(sam: Sam, spec: StepSpec, samples: list[Sample], trace: Path, table: Path, snap: Path | None):
    interactive.profile(sam, samples, trace, table, snap)


def generator_kwargs(workload: dict[str, Any]) -> dict[str, Any]:
    """The generator's keyword arguments from a spec's resolved workload."""
    return {k: v for k, v in workload.items() if k != "name"}


WORKLOADS = {
    POINTS: Workload(
        name=POINTS,
        summary="batched encoder, then each image's point prompts through the decoder (the blog's harness)",
        measure=_measure_points,
        record=_record_points,
        outputs=Outputs.of_bench,
        from_state=Outputs.from_state,
        deviation=deviation,
        tolerance_keys=PROMPT_MEASURES,
        profile=_profile_points,
    ),
    AMG: Workload(
        name=AMG,
        summary="the official SamAutomaticMaskGenerator on every image (segment everything)",
        measure=_measure_amg,
        record=_record_amg,
        outputs=AmgOutputs.of_run,
        from_state=AmgOutputs.from_state,
        deviation=amg_deviation,
        tolerance_keys=("amg_matched_miou_min", "amg_match_share_min", "embedding_sqnr_min_db"),
        profile=_profile_amg,
    ),
    INTERACTIVE: Workload(
        name=INTERACTIVE,
        summary="batch 1: each image embedded, then each of its prompts decoded alone (click latency)",
        measure=_measure_interactive,
        record=_record_interactive,
        outputs=interactive.InteractiveResult.outputs,
        from_state=Outputs.from_state,
        deviation=deviation,
        tolerance_keys=PROMPT_MEASURES,
        profile=_profile_interactive,
    ),
}
NAMES = tuple(WORKLOADS)
OPTIONS = {POINTS: {}, AMG: amg.OPTIONS, INTERACTIVE: {}}  # what the command line may set for each, with defaults


def resolve(name: str, model: str, options: dict[str, int]) -> dict[str, Any]:
    """A spec's workload: its name and every setting it runs with (defaults included, so that a changed default
    changes the resume key). ValueError names what is valid."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(NAMES)}")
    stray = [flag(k) for k in options if k not in OPTIONS[name]]
    if stray:
        valid = ", ".join(flag(k) for k in OPTIONS[name]) or "none"
        raise ValueError(f"{', '.join(stray)} not taken by --workload {name} (its options: {valid})")
    for key, value in options.items():
        least = 0 if key == "crop_n_layers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{flag(key)} must be an integer >= {least}, got {value!r}")
    return {"name": name} | (amg.settings(model, options) if name == AMG else {})


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def describe(workload: dict[str, Any], batch_size: int) -> str:
    """The workload's size in a few words, for the runner's first line."""
    if workload["name"] == INTERACTIVE:
        return "interactive: batch 1, each prompt decoded alone"
    if workload["name"] != AMG:
        return f"batch {batch_size}"
    layers = workload["crop_n_layers"]
    return (
        f"automatic mask generation: {workload['points_per_side']}² points per image"
        + (f" and {layers} crop layer(s)" if layers else "")
        + f", {workload['points_per_batch']} per decoder batch"
    )
