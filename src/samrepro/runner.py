"""Run a plan: one fresh `python -m samrepro.step` process per step, resumable; then the report and tracking.

A results folder holds plan.json, one StepResult JSON per step (the source of truth), specs/ (what each step
was asked to run, for resume), logs/ (each step's output), baseline.pt (the fp32 step's outputs), traces/ and
runner.lock (one runner per folder, see lock.py), report/ and stale/ (results of steps no longer in the plan).
Input checks live in inputs.py, the step process's supervision in supervise.py.

Bad input (names, weights, data, plan, folder) is refused before the first step starts. Interruption loses
nothing finished: every result is written atomically, so a step is either complete on disk or absent. SIGINT or
SIGTERM stop the running step's process (it writes no result) and raise Interrupted; after a kill -9 of the runner
the kernel kills the step too (Linux: PR_SET_PDEATHSIG), so no orphan writes into a folder a rerun is using.
A rerun keeps the finished steps and runs the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samrepro import console, env, lock, plans, results, supervise
from samrepro.checkpoints import cache_root
from samrepro.inputs import (
    UsageError,
    check_inputs,
    check_patches,
    config_error,
    first_line,
    resolve_data,
    resolve_weights,
    unavailable,
    weights_digest,
)
from samrepro.plans import Plan, ResolvedStep
from samrepro.results import StepResult, utc_now
from samrepro.step import BASELINE
from samrepro.supervise import Interrupted

STEP_COMMAND = [sys.executable, "-m", "samrepro.step"]  # + the spec path
VOLATILE = ("results_dir", "cache_dir", "profile")  # spec keys that do not change what a step measures


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


def run_ablation(
    model: str,
    device: str,
    plan: str | Path | Plan | None = None,
    patches: list[str] | None = None,
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
        patches: instead of a plan, fp32 then one step per patch; a patch that cannot run here is an error.
        prompts: at most this many prompts per image (None: all).
        weights: "random", a checkpoint path, or None: tiny's shipped weights, random for the vit_* models.
        force: rerun steps whose results already exist.
        track: log the results folder to MLflow at the end.
    """
    check_inputs(model, device, mode, batch_size, images, prompts)
    if batch_size > images:  # padding a few images up to a large batch would time images that do not exist
        _say(f"batch size {batch_size} > {images} images: running batches of {images}")
        batch_size = images
    if patches is not None:
        if plan is not None:
            raise UsageError("give a plan or a list of patches, not both")
        check_patches(patches, device)
        plan = plans.adhoc(patches)
    weights = resolve_weights(model, weights)
    data = resolve_data(data)
    if not isinstance(plan, Plan):
        plan = plans.load(plans.find_plan(str(plan or default_plan(device))))
    steps = plans.resolve(plan, mode, lambda names: unavailable(names, device))
    folder = Path(results_dir or default_results_dir(model, device, plan.name, mode, batch_size))
    command = command or shlex.join(sys.argv)
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
    }
    if weights == "random" and model != "tiny":
        _say(f"WARNING: {model} with RANDOM weights: speed only, accuracy against ground truth is meaningless")
    setup["bounds_off"] = plan.bounds_apply(setup)  # None: the plan's step bounds were calibrated on this workload
    with supervise.interruptible(), _locked(folder, command):
        try:
            _write_json(folder / "plan.json", setup | {"command": command})
            _set_aside_stale(folder, [_filename(s) for s in steps])
            _say(f"{plan.name} ({mode}) on {model}/{device}, batch {batch_size}, {images} images -> {folder}")
            step_results, wall_s = _run_steps(folder, steps, setup, force, profile)
            outcome = Outcome(folder, step_results)
            _conclude(step_results, wall_s)
            _finish(folder, tracking_uri, track)
        except Interrupted as e:
            e.results_dir = folder
            raise
    return outcome


def _run_steps(
    folder: Path, steps: list[ResolvedStep], setup: dict[str, Any], force: bool, profile: bool
) -> tuple[list[StepResult], dict[str, float]]:
    """Every step's result (kept or new) and the wall seconds of the steps run now."""
    out, wall_s, view = [], {}, console.StepView()
    for step in steps:
        spec = setup | {
            "index": step.index,
            "step": step.name,
            "patches": list(step.patches),
            "configs": step.configs,
            **tolerance_spec(step, setup),
            "note": step.note,
            "results_dir": str(folder.resolve()),
            "cache_dir": str(cache_root()),
            "profile": profile,
        }
        kept = None if force else reusable(folder, step, spec)
        if kept is not None:
            _say(f"step {step.index:02d} {step.name}: kept ({kept.status}, results exist; --force reruns it)")
            out.append(kept)
            continue
        _write_json(folder / "specs" / _filename(step), spec)
        start = time.monotonic()
        if step.skip_reason:
            result = _skip(step, spec)
        elif bad := config_error(step):
            result = _fail(step, spec, bad)
        else:
            result = _spawn(folder, step, spec, view)
            wall_s[step.name] = time.monotonic() - start
        base = next((r.img_s for r in out if r.index == 0 and r.status == "ok"), None)
        line = console.result_line(result, base)
        if result.status == "failed" and step.name in wall_s:
            line += f"; log: {folder / 'logs' / Path(_filename(step)).with_suffix('.log')}"
        if step.name in wall_s:
            view.finish(line)
        else:
            _say(line)
        out.append(result)
    return out, wall_s


def tolerance_spec(step: ResolvedStep, setup: dict[str, Any]) -> dict[str, Any]:
    """The plan bound a step is gated with, and a line saying where its tolerance comes from."""
    if not step.tolerance:
        return {"tolerance": {}, "tolerance_source": "declared (the patches' composed tolerances)"}
    bound = ", ".join(f"{k}={v:g}" for k, v in sorted(step.tolerance.items()))
    if why := setup["bounds_off"]:
        return {"tolerance": {}, "tolerance_source": f"declared; plan bound {bound} not applied: {why}"}
    return {"tolerance": step.tolerance, "tolerance_source": f"declared, tightened by the plan: {bound}"}


def reusable(folder: Path, step: ResolvedStep, spec: dict[str, Any]) -> StepResult | None:
    """The existing result of this step when it answers the same spec: ok, or skipped for the same reason."""
    path, spec_path = folder / _filename(step), folder / "specs" / _filename(step)
    if not path.is_file() or not spec_path.is_file():
        return None
    try:
        old, old_spec = results.read(path), json.loads(spec_path.read_text())
    except (OSError, ValueError, TypeError) as e:  # e.g. truncated by a crash of an older, non-atomic writer
        _say(f"WARNING: {path.name} is unreadable ({first_line(str(e))}); running the step again")
        return None
    if old.plan_hash != spec["plan_hash"] or _key(old_spec) != _key(spec):
        return None
    if step.skip_reason is not None:
        return old if old.status == "skipped" and old.reason == step.skip_reason else None
    if step.baseline and not (folder / BASELINE).is_file():
        return None
    return old if old.status == "ok" else None


def _skip(step: ResolvedStep, spec: dict[str, Any]) -> StepResult:
    now = utc_now()
    result = _result(step, spec, status="skipped", reason=step.skip_reason, started_at=now, finished_at=now)
    result.env = env.capture(spec["plan"])
    results.write(result, Path(spec["results_dir"]))
    return result


def _fail(step: ResolvedStep, spec: dict[str, Any], reason: str) -> StepResult:
    now = utc_now()
    result = _result(step, spec, status="failed", reason=reason, started_at=now, finished_at=now)
    results.write(result, Path(spec["results_dir"]))
    return result


def _spawn(folder: Path, step: ResolvedStep, spec: dict[str, Any], view: console.StepView) -> StepResult:
    """Run the step in a fresh process: its output to its log file, its phases to `view`; a crash without a
    result is recorded as failed with the log's last lines."""
    path = folder / _filename(step)
    path.unlink(missing_ok=True)
    log_path = folder / "logs" / Path(_filename(step)).with_suffix(".log")
    log_path.parent.mkdir(exist_ok=True)
    started = utc_now()
    view.start(f"step {step.index:02d} {step.name}", " + ".join(step.patches) or "fp32 baseline")
    events, child_end = os.pipe()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(
                [*STEP_COMMAND, str(folder / "specs" / _filename(step))],
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_end,),
                env=supervise.step_env(child_end),
                preexec_fn=supervise.preexec(),
            )
        finally:
            os.close(child_end)  # the child holds its own copy: end of file when it exits
        with proc:
            try:
                supervise.relay(events, view)
                code = proc.wait()
            except BaseException:  # interrupted: the step goes too, without a result (a finished one stays)
                supervise.stop(proc)
                view.finish(f"step {step.index:02d} {step.name}: interrupted (its log: {log_path})")
                raise
            finally:
                os.close(events)
    if path.is_file():
        return results.read(path)
    why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    result = _result(step, spec, status="failed", reason=f"step process {why} without writing a result")
    result.error, result.started_at, result.finished_at = supervise.tail(log_path), started, utc_now()
    results.write(result, folder)
    return result


@contextlib.contextmanager
def _locked(folder: Path, command: str) -> Iterator[None]:
    """This process's exclusive use of the folder (lock.py); a folder that cannot be written is bad input."""
    held = lock.FolderLock(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        left = held.acquire(command)
    except OSError as e:
        raise UsageError(f"results folder {folder} is not writable ({e})") from None
    with held:
        if left:
            _say(f"WARNING: recovered a stale lock on {folder} from a runner that died ({lock.describe(left)})")
        for tmp in [*folder.glob(".tmp-*"), *folder.glob("*.tmp"), *folder.glob("specs/*.tmp")]:
            tmp.unlink()  # a write cut short by a kill; never read as a result
        yield


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
        run_id = tracking.log_results_dir(folder, tracking_uri)
        store = tracking_uri or tracking.default_tracking_uri(Path.cwd())
        _say(f"MLflow: parent run {run_id} in {store}; browse it with `samrepro ui` (or `nox -s ui`)")
    except tracking.TrackingUnavailable as e:
        _say(f"{later} ({e})")
    except Exception as e:  # any other MLflow failure: the results on disk still stand
        _say(f"{later} (MLflow failed: {type(e).__name__}: {first_line(str(e))})")


def _set_aside_stale(folder: Path, current: list[str]) -> None:
    """Step results of steps no longer in the plan move to stale/, so reports only see this plan's steps."""
    for path in folder.glob("step_*.json"):
        if path.name not in current:
            (folder / "stale").mkdir(exist_ok=True)
            path.replace(folder / "stale" / path.name)
            _say(f"moved {path.name} (not a step of this plan) to {folder / 'stale'}")


def _conclude(step_results: list[StepResult], wall_s: dict[str, float]) -> None:
    """The summary table and the totals a user needs to judge the run."""
    console.summary(step_results, wall_s)
    warm = sum(r.compile_s or 0.0 for r in step_results if r.step in wall_s)
    failed = [r.step for r in step_results if r.status == "failed" or r.gate == "fail"]
    ran = f"{len(wall_s)} step process(es) ran in {sum(wall_s.values()):.0f}s, {warm:.0f}s of it compiling/warming up"
    _say(ran + (f"; FAILED: {', '.join(failed)}" if failed else "; every gate passed"))


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
    console.say(line)
