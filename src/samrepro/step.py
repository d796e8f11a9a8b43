"""One ablation step in a fresh process: `python -m samrepro.step SPEC_JSON_PATH` writes its StepResult JSON.

The spec (written by the runner) names the model, device, data, patches and their configs; the fp32 baseline
step also stores its masks, IoU predictions and first-batch embeddings in BASELINE for the later steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

import samrepro
from samrepro import bench, env, flops, results
from samrepro.console import emit
from samrepro.gates import plan_tolerance
from samrepro.kernels import COUNTERS
from samrepro.metrics import check_tolerance, mask_iou, max_abs, sqnr_db
from samrepro.models import fp32_reference_mode, load_model
from samrepro.registry import apply_patches, get_patch, ordered
from samrepro.results import StepResult, utc_now
from samrepro.workload import Sample

BASELINE = "baseline.pt"
INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"  # every step of every run on this machine shares it (yours wins if set)
# What the baseline step shares with every later step of a run.
INPUT_KEYS = ("model", "device", "batch_size", "images", "prompts", "weights", "weights_sha256", "data")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m samrepro.step SPEC_JSON_PATH", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    os.environ[INDUCTOR_CACHE] = samrepro.USER_INDUCTOR_CACHE or str(
        env.inductor_cache(Path(spec["cache_dir"]), spec["device"])
    )
    result = StepResult(
        model=spec["model"],
        device=spec["device"],
        batch_size=spec["batch_size"],
        step=spec["step"],
        index=spec["index"],
        patches=list(spec["patches"]),
        status="failed",
        gate="skipped",
        weights=str(spec["weights"]),
        plan=spec["plan"]["name"],
        plan_hash=spec["plan_hash"],
        mode=spec["mode"],
        configs=spec["configs"],
        reason=spec.get("note"),
        started_at=utc_now(),
    )
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
    results.write(result, Path(spec["results_dir"]))
    return code


def run(spec: dict[str, Any], result: StepResult) -> None:
    """Load, patch, bench, compare with the baseline and gate; fills `result` in place."""
    from samrepro import data  # written alongside; imported late so a missing loader fails this step only

    folder = Path(spec["results_dir"])
    patches = [get_patch(name) for name in ordered(spec["patches"])]
    result.patches = [p.name for p in patches]
    result.configs = {  # every field, defaults included
        p.name: p.config_cls.from_dict(spec["configs"].get(p.name, {})).to_dict() for p in patches
    }
    result.changes_weights = any(p.changes_weights for p in patches)
    emit("loading")
    samples, data_label = data.load_dataset(spec["data"], spec["images"], Path(spec["cache_dir"]))
    samples = limit_prompts(samples, spec["prompts"])
    sam = load_model(spec["model"], spec["device"], spec["weights"])
    result.weights = sam.weights_label
    fp32_reference_mode()
    emit("patching")
    apply_patches(sam, result.patches, spec["configs"])  # never undone: the process ends with the step
    result.env = env.capture(spec["plan"]) | {"data": data_label, "inductor_cache": os.environ[INDUCTOR_CACHE]}

    emit("compiling" if any(get_patch(n).compiles for n in result.patches) else "warming")
    out = bench.run(sam, samples, spec["batch_size"], progress=lambda done, n: emit("timing", done=done, total=n))
    result.env["memory_source"] = out.memory_source
    result.images, result.prompts_per_image = out.images, out.prompts / out.images
    result.img_s, result.compile_s = out.img_s, out.compile_s
    result.latency_ms_p50, result.latency_ms_p90 = out.latency_pct(50), out.latency_pct(90)
    result.encoder_ms = out.encoder_ms
    encoded = -(-out.images // spec["batch_size"]) * spec["batch_size"]  # the last batch is padded
    result.encoder_tflop_s = flops.tflop_s(spec["model"], encoded, out.encoder_s)
    result.peak_mem_mib, result.peak_mem_reserved_mib = out.peak_mem_mib, out.peak_mem_reserved_mib
    result.miou_gt = out.miou_gt
    result.kernel_paths = dict(COUNTERS)  # which hand-written kernel paths ran (triton_attn counts its calls)

    emit("gating")
    if spec["index"] == 0:
        save_baseline(folder / BASELINE, out, {k: spec[k] for k in INPUT_KEYS})
        result.gate, result.reason = "skipped", "reference step"
    else:
        gate(result, out, folder / BASELINE, spec, same_change_reference(spec, result.patches, samples))

    if spec.get("profile"):
        stem = folder / "traces" / result.filename().removesuffix(".json")
        result.env["profile"] = profile(sam, result.patches, samples, spec["batch_size"], stem)


def profile(sam: Sam, patches: list[str], samples: list[Sample], batch_size: int, stem: Path) -> str:
    """A trace (and on GPU a memory snapshot) of one more batch; a failure here keeps the measured result."""
    snapshot = Path(f"{stem}.memory.pickle") if sam.device.type == "cuda" else None
    if snapshot is not None and "compile" in patches:
        snapshot = None  # CUDA graphs (max-autotune) and the memory recorder do not mix
    try:
        bench.profile(sam, samples, batch_size, Path(f"{stem}.trace.json.gz"), Path(f"{stem}.ops.txt"), snapshot)
    except Exception as e:
        traceback.print_exc()
        return f"failed: {type(e).__name__}: {e}"
    return "trace + ops table" + (" + memory snapshot" if snapshot else "")


def same_change_reference(spec: dict[str, Any], names: list[str], samples: list[Sample]) -> SameChange | None:
    """With random weights, the outputs of fp32 with the step's weight change made in plain arithmetic (the
    weight-changing patch's reference config); None where the step is gated against the fp32 step as it is."""
    changing = [get_patch(n) for n in names if get_patch(n).reference_config is not None]
    if spec["weights"] != "random" or not changing:
        return None
    (patch,) = changing  # weight-changing patches exclude each other
    emit("reference")
    ref = load_model(spec["model"], spec["device"], spec["weights"])
    apply_patches(ref, [patch.name], {patch.name: patch.reference_config})
    out = bench.run(ref, samples, spec["batch_size"], warmup=0)
    return SameChange(patch.name, patch.reference_config, outputs(out))


@dataclasses.dataclass
class SameChange:
    """fp32 with one patch's weight change and nothing else: what a random-weight step is gated against."""

    patch: str
    config: dict[str, Any]
    state: dict[str, Any]  # as outputs() stores it


def gate(
    result: StepResult,
    out: bench.BenchResult,
    baseline_path: Path,
    spec: dict[str, Any],
    same_change: SameChange | None = None,
) -> None:
    """Agreement, SQNR and IoU-prediction deviation against the fp32 step (or, with `same_change`, against fp32
    with the same weight change), checked against the tolerance."""
    patches = [get_patch(name) for name in result.patches]
    # the composition the equivalence gates use; a plan bound can demand more than declared, never less
    tol = plan_tolerance(patches).tighten(spec["tolerance"])
    result.tolerance, result.tolerance_source = tol.to_dict(), spec.get("tolerance_source", "")
    if not baseline_path.is_file():
        result.gate, result.reason = "skipped", f"no fp32 baseline ({baseline_path.name}): the first step did not run"
        return
    ref = torch.load(baseline_path, weights_only=True)
    if ref["inputs"] != {k: spec[k] for k in INPUT_KEYS}:
        raise RuntimeError(f"{baseline_path} was measured with other settings: {ref['inputs']}")
    measured = compare(ref, out)
    if same_change:
        unchanged, measured = measured, compare(same_change.state, out)
        others = plan_tolerance([p for p in patches if p.name != same_change.patch])
        tol = others.compose(get_patch(same_change.patch).reference_tolerance).tighten(spec["tolerance"])
        result.tolerance = tol.to_dict()
        result.tolerance_source = (
            f"random weights: against fp32 with {same_change.patch}'s weight change made plainly "
            f"({same_change.config}), as its declared tolerance holds for trained weights; "
            f"against fp32 as it is: agreement {unchanged['miou_agreement']:.3f}, "
            f"SQNR {unchanged['embedding_sqnr_db']:.1f} dB"
        )
    result.miou_agreement, result.embedding_sqnr_db = measured["miou_agreement"], measured["embedding_sqnr_db"]
    result.gate_violations = check_tolerance(measured, tol)
    result.gate = "fail" if result.gate_violations else "pass"


def compare(ref: dict[str, Any], out: bench.BenchResult) -> dict[str, float | None]:
    """The measured deviation of a step's outputs from the stored fp32 ones."""
    ious = [
        mask_iou(m.unpack(), bench.Masks(tuple(shape), bits).unpack())
        for m, shape, bits in zip(out.best_masks, ref["shapes"], ref["bits"], strict=True)
    ]
    ious = torch.cat(ious) if ious else torch.zeros(0)
    ref_gt = ref["miou_gt"]
    return {
        "miou_agreement": ious.mean().item() if ious.numel() else None,
        "embedding_sqnr_db": sqnr_db(ref["embeddings"], out.embeddings),
        "iou_pred_max_abs": max((max_abs(r, o) for r, o in zip(ref["iou_preds"], out.iou_preds)), default=0.0),
        "miou_gt_drop": None if ref_gt is None or out.miou_gt is None else ref_gt - out.miou_gt,
    }


def outputs(out: bench.BenchResult) -> dict[str, Any]:
    """What a step is compared on: best masks, IoU predictions, first-batch embeddings, mIoU."""
    return {
        "shapes": [list(m.shape) for m in out.best_masks],
        "bits": [m.bits for m in out.best_masks],
        "iou_preds": out.iou_preds,
        "embeddings": out.embeddings,
        "miou_gt": out.miou_gt,
    }


def save_baseline(path: Path, out: bench.BenchResult, inputs: dict[str, Any]) -> None:
    state = {"inputs": inputs, **outputs(out)}
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
