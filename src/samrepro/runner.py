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
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from samrepro import conclude, console, env, lock, plans, results, supervise
from samrepro.checkpoints import cache_root
from samrepro.console import say as _say
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
from samrepro.spec import INPUT_KEYS, StepSpec
from samrepro.step import BASELINE
from samrepro.supervise import Interrupted

T = TypeVar("T")
STEP_COMMAND = [sys.executable, "-m", "samrepro.step"]  # + the spec path


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
            results.write_json(folder / results.PLAN_FILE, setup | {"command": command})
            _set_aside_stale(folder, [_filename(s) for s in steps])
            _say(f"{plan.name} ({mode}) on {model}/{device}, batch {batch_size}, {images} images -> {folder}")
            step_results, wall_s = _run_steps(folder, steps, setup, force, profile)
            outcome = Outcome(folder, step_results)
            conclude.summary(step_results, wall_s)
            conclude.report_and_track(folder, tracking_uri, track)
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
        spec = StepSpec(
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
        kept = None if force else reusable(folder, step, spec)
        if kept is not None:
            _say(f"step {step.index:02d} {step.name}: kept ({kept.status}, results exist; --force reruns it)")
            out.append(kept)
            continue
        spec.write(folder / "specs" / _filename(step))
        start = time.monotonic()
        if step.skip_reason:
            result = _recorded(folder, spec.result(status="skipped", reason=step.skip_reason), capture_env=True)
        elif bad := config_error(step):
            result = _recorded(folder, spec.result(reason=bad))
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


def reusable(folder: Path, step: ResolvedStep, spec: StepSpec) -> StepResult | None:
    """The existing result of this step when it answers the same spec: ok, or skipped for the same reason."""
    path, spec_path = folder / _filename(step), folder / "specs" / _filename(step)
    if not path.is_file() or not spec_path.is_file():
        return None
    old, old_spec = _read_or_warn(results.read, path), _read_or_warn(StepSpec.read, spec_path)
    if old is None or old_spec is None:
        return None
    if old.plan_hash != spec.plan_hash or old_spec.key() != spec.key():
        return None
    if step.skip_reason is not None:
        return old if old.status == "skipped" and old.reason == step.skip_reason else None
    if step.baseline and not (folder / BASELINE).is_file():
        return None
    return old if old.status == "ok" else None


def _read_or_warn(read: Callable[[Path], T], path: Path) -> T | None:
    """`read(path)`, or None with a warning: truncated by a crash, or written by another revision of samrepro."""
    try:
        return read(path)
    except (OSError, ValueError, TypeError) as e:
        _say(f"WARNING: {path.name} is unreadable ({first_line(str(e))}); running the step again")
        return None


def _recorded(folder: Path, result: StepResult, capture_env: bool = False) -> StepResult:
    """The result of a step that ran no process, written now."""
    result.started_at = result.finished_at = utc_now()
    if capture_env:
        result.env = env.capture()
    results.write(result, folder)
    return result


def _spawn(folder: Path, step: ResolvedStep, spec: StepSpec, view: console.StepView) -> StepResult:
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
    result = spec.result(reason=f"step process {why} without writing a result", error=supervise.tail(log_path))
    result.started_at, result.finished_at = started, utc_now()
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
        for tmp in [*folder.glob(".tmp-*"), *folder.glob("*.tmp"), *folder.glob("specs/.tmp-*")]:
            tmp.unlink()  # a write cut short by a kill; never read as a result
        yield


def _set_aside_stale(folder: Path, current: list[str]) -> None:
    """Step results of steps no longer in the plan move to stale/, so reports only see this plan's steps."""
    for path in folder.glob("step_*.json"):
        if path.name not in current:
            (folder / "stale").mkdir(exist_ok=True)
            path.replace(folder / "stale" / path.name)
            _say(f"moved {path.name} (not a step of this plan) to {folder / 'stale'}")


def _filename(step: ResolvedStep) -> str:
    return f"step_{step.index:02d}_{step.name}.json"
