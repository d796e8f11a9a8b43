"""Run a plan: one fresh `python -m samrepro.step` process per step, resumable; then the report and tracking.

A results folder holds plan.json, one StepResult JSON per step (the source of truth), specs/ (what each step
was asked to run, for resume), logs/ (each step's output), baseline.pt (the fp32 step's outputs) and traces/.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import traceback
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from samrepro import env, plans, results
from samrepro.models import MODELS, TINY_WEIGHTS
from samrepro.plans import Plan, ResolvedStep
from samrepro.registry import get_patch, list_patches
from samrepro.results import StepResult
from samrepro.step import BASELINE

STEP_COMMAND = [sys.executable, "-m", "samrepro.step"]  # + the spec path
STDERR_TAIL = 40  # lines of a crashed step's output kept in its result
VOLATILE = ("results_dir", "cache_dir", "profile")  # spec keys that do not change what a step measures
DEVICES = ("cpu", "cuda")


class UsageError(ValueError):
    """Bad input from the user; the message says what is valid."""


@dataclass
class Outcome:
    results_dir: Path
    results: list[StepResult]

    @property
    def exit_code(self) -> int:
        """0 when every step ran or was skipped and no gate failed."""
        return int(any(r.status == "failed" or r.gate == "fail" for r in self.results))


def default_results_dir(model: str, device: str, plan: str, mode: str, batch_size: int) -> Path:
    return Path("results") / f"{model}-{device}-{plan}-{mode}-bs{batch_size}"


def default_plan(device: str) -> str:
    return "blog" if device.startswith("cuda") else "cpu"


def cache_dir() -> Path:
    return Path(os.environ.get("SAMREPRO_CACHE", Path.home() / ".cache" / "samrepro"))


def run_ablation(
    model: str,
    device: str,
    plan: str | Path | Plan | None = None,
    mode: str = "cumulative",
    batch_size: int = 8,
    images: int = 32,
    prompts: int | None = None,
    weights: str | None = None,
    data: str = "synthetic",
    results_dir: Path | None = None,
    tracking_uri: str | None = None,
    force: bool = False,
    profile: bool = False,
    track: bool = True,
    command: str | None = None,
) -> Outcome:
    """Run every step of `plan` on `model`/`device`, each in its own process; returns the StepResults.

    Args:
        plan: a Plan, a plan file, or a plan name in ablations/ (default: blog on cuda, cpu on cpu).
        prompts: at most this many prompts per image (None: all).
        weights: "random", a checkpoint path, or None: tiny's shipped weights, random for the vit_* models.
        force: rerun steps whose results already exist.
        track: log the results folder to MLflow at the end.
    """
    check_inputs(model, device, mode, batch_size, images, prompts)
    weights = resolve_weights(model, weights)
    data = resolve_data(data)
    if not isinstance(plan, Plan):
        plan = plans.load(plans.find_plan(str(plan or default_plan(device))))
    steps = plans.resolve(plan, mode, lambda names: unavailable(names, device))
    folder = Path(results_dir or default_results_dir(model, device, plan.name, mode, batch_size))
    plan_hash = plan.hash()
    setup = {
        "plan": plan.to_dict(),
        "plan_hash": plan_hash,
        "mode": mode,
        "model": model,
        "device": device,
        "batch_size": batch_size,
        "images": images,
        "prompts": prompts,
        "weights": weights,
        "data": data,
    }
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "plan.json", setup | {"command": command or shlex.join(sys.argv)})
    _set_aside_stale(folder, [_filename(s) for s in steps])
    _say(f"{plan.name} ({mode}) on {model}/{device}, batch {batch_size}, {images} images -> {folder}")

    out = []
    for step in steps:
        spec = setup | {
            "index": step.index,
            "step": step.name,
            "patches": list(step.patches),
            "configs": step.configs,
            "tolerance": step.tolerance,
            "note": step.note,
            "results_dir": str(folder.resolve()),
            "cache_dir": str(cache_dir()),
            "profile": profile,
        }
        kept = None if force else reusable(folder, step, spec)
        if kept is not None:
            _say(f"step {step.index:02d} {step.name}: kept ({kept.status}, results exist)")
            out.append(kept)
            continue
        _write_json(folder / "specs" / _filename(step), spec)
        if step.skip_reason:
            result = _skip(step, spec)
        elif bad := config_error(step):
            result = _fail(step, spec, bad)
        else:
            result = _spawn(folder, step, spec)
        _say(_summary(result))
        out.append(result)

    outcome = Outcome(folder, out)
    _finish(folder, tracking_uri, track)
    return outcome


def check_inputs(model: str, device: str, mode: str, batch_size: int, images: int, prompts: int | None) -> None:
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if mode not in plans.MODES:
        raise UsageError(f"unknown mode {mode!r}; valid: {', '.join(plans.MODES)}")
    for name, value in (("batch size", batch_size), ("images", images), ("prompts", prompts)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")


def resolve_weights(model: str, weights: str | None) -> str | None:
    """None stays None (tiny's shipped weights, which must exist); vit_* default to random; paths get absolute."""
    if weights is None and model != "tiny":
        _say(f"WARNING: {model} with RANDOM weights (no --weights given): speed only, accuracy vs GT is meaningless")
        return "random"
    if weights is None:
        if not TINY_WEIGHTS.is_file():
            raise UsageError(f"the shipped tiny weights are missing ({TINY_WEIGHTS}); pass --weights random or PATH")
        return None
    if weights == "random":
        return weights
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"weights must be 'random' or a checkpoint file; not found: {weights}")
    return str(path.resolve())


def resolve_data(data: str) -> str:
    if data == "synthetic":
        return data
    if data.startswith("coco:"):
        root = Path(data[len("coco:") :])
        if not root.is_dir():
            raise UsageError(f"COCO folder not found: {root}")
        return f"coco:{root.resolve()}"
    raise UsageError(f"unknown data {data!r}; valid: synthetic, coco:DIR")


def unavailable(names: list[str], device: str) -> str | None:
    """Why these patches cannot run on `device` (not registered, or the machine lacks what they need)."""
    registered = list_patches()
    missing = [n for n in names if n not in registered]
    if missing:
        return f"patch(es) {', '.join(missing)} not registered (registered: {', '.join(registered)})"
    reasons = [f"{n}: {r}" for n in names if (r := get_patch(n).unavailable_reason(device))]
    return "; ".join(reasons) or None


def config_error(step: ResolvedStep) -> str | None:
    """Why a step's patch configs are invalid (checked here, so a bad plan fails fast), else None."""
    for name, config in step.configs.items():
        try:
            get_patch(name).config_cls.from_dict(config)
        except (TypeError, ValueError) as e:
            return f"invalid config for {name}: {e}"
    return None


def reusable(folder: Path, step: ResolvedStep, spec: dict[str, Any]) -> StepResult | None:
    """The existing result of this step when it answers the same spec: ok, or skipped for the same reason."""
    path, spec_path = folder / _filename(step), folder / "specs" / _filename(step)
    if not path.is_file() or not spec_path.is_file():
        return None
    try:
        old, old_spec = results.read(path), json.loads(spec_path.read_text())
    except (OSError, ValueError, TypeError):
        return None
    if old.plan_hash != spec["plan_hash"] or _key(old_spec) != _key(spec):
        return None
    if step.skip_reason is not None:
        return old if old.status == "skipped" and old.reason == step.skip_reason else None
    if step.baseline and not (folder / BASELINE).is_file():
        return None
    return old if old.status == "ok" else None


def _skip(step: ResolvedStep, spec: dict[str, Any]) -> StepResult:
    now = _now()
    result = _result(step, spec, status="skipped", reason=step.skip_reason, started_at=now, finished_at=now)
    result.env = env.capture(spec["plan"])
    results.write(result, Path(spec["results_dir"]))
    return result


def _fail(step: ResolvedStep, spec: dict[str, Any], reason: str) -> StepResult:
    now = _now()
    result = _result(step, spec, status="failed", reason=reason, started_at=now, finished_at=now)
    results.write(result, Path(spec["results_dir"]))
    return result


def _spawn(folder: Path, step: ResolvedStep, spec: dict[str, Any]) -> StepResult:
    """Run the step in a fresh process, relaying its output; a crash without a result is recorded as failed."""
    path = folder / _filename(step)
    path.unlink(missing_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    started = _now()
    _say(f"step {step.index:02d} {step.name}: {' + '.join(step.patches) or 'fp32 baseline'}")
    tail: deque[str] = deque(maxlen=STDERR_TAIL)
    with open(folder / "logs" / Path(_filename(step)).with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(
            [*STEP_COMMAND, str(folder / "specs" / _filename(step))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},  # progress arrives as it is printed
        )
        for line in proc.stdout:
            sys.stderr.write(line)
            log.write(line)
            tail.append(line)
        code = proc.wait()
    if path.is_file():
        return results.read(path)
    why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    result = _result(step, spec, status="failed", reason=f"step process {why} without writing a result")
    result.error, result.started_at, result.finished_at = "".join(tail), started, _now()
    results.write(result, folder)
    return result


def _result(step: ResolvedStep, spec: dict[str, Any], **fields: Any) -> StepResult:
    return StepResult(
        model=spec["model"],
        device=spec["device"],
        batch_size=spec["batch_size"],
        step=step.name,
        index=step.index,
        patches=list(step.patches),
        gate="skipped",
        weights=spec["weights"] or "shipped tiny weights",
        plan=spec["plan"]["name"],
        plan_hash=spec["plan_hash"],
        mode=spec["mode"],
        configs=step.configs,
        **fields,
    )


def _finish(folder: Path, tracking_uri: str | None, track: bool) -> None:
    """The report, then tracking; neither can lose results, so neither fails the run."""
    try:
        from samrepro import report

        _say(f"report: {report.write_report(folder)}")
    except Exception as e:  # the JSONs are the truth; the report can be rebuilt
        if not isinstance(e, ImportError):
            traceback.print_exc()
        _say(f"report not written ({type(e).__name__}: {e}); run `samrepro report {folder}` later")
    if not track:
        return
    later = f"results kept in {folder}; run `samrepro log {folder}` later"
    try:
        from samrepro import tracking
    except ImportError as e:
        _say(f"{later} (tracking unavailable: {e})")
        return
    try:
        _say(f"logged to MLflow: {tracking.log_results_dir(folder, tracking_uri)}")
    except tracking.TrackingUnavailable as e:
        _say(f"{later} ({e})")


def _set_aside_stale(folder: Path, current: list[str]) -> None:
    """Step results of steps no longer in the plan move to stale/, so reports only see this plan's steps."""
    for path in folder.glob("step_*.json"):
        if path.name not in current:
            (folder / "stale").mkdir(exist_ok=True)
            path.replace(folder / "stale" / path.name)
            _say(f"moved {path.name} (not a step of this plan) to {folder / 'stale'}")


def _summary(r: StepResult) -> str:
    head = f"step {r.index:02d} {r.step}: {r.status}"
    if r.status != "ok":
        return f"{head} ({r.reason})"
    gate = r.gate + (f": {'; '.join(r.gate_violations)}" if r.gate_violations else "")
    return f"{head}, {r.img_s:.2f} img/s, p50 {r.latency_ms_p50:.1f} ms, gate {gate}"


def _key(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in VOLATILE}


def _filename(step: ResolvedStep) -> str:
    return f"step_{step.index:02d}_{step.name}.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
