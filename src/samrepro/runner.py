"""Run a plan: one fresh `python -m samrepro.step` process per step, resumable; then the report and tracking.

A results folder holds plan.json, one StepResult JSON per step (the source of truth), specs/ (what each step
was asked to run, for resume), logs/ (each step's output), baseline.pt (the fp32 step's outputs), traces/ and
runner.lock (one runner per folder, see lock.py), report/ and stale/ (results of steps no longer in the plan).
Input checks (inputs.py) and what each step measures (ablation.py) are shared with `samrepro sweep`; the step
process's supervision is in supervise.py.

Bad input (names, weights, data, plan, folder) is refused before the first step starts. Interruption loses
nothing finished: every result is written atomically, so a step is either complete on disk or absent. SIGINT or
SIGTERM stop the running step's process (it writes no result) and raise Interrupted; after a kill -9 of the runner
the kernel kills the step too (Linux: PR_SET_PDEATHSIG), so no orphan writes into a folder a rerun is using.
A rerun keeps the finished steps and runs the rest.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from samrepro import ablation, conclude, console, env, lock, results, supervise, workloads
from samrepro.console import say as _say
from samrepro.inputs import UsageError, config_error, first_line
from samrepro.plans import Plan, ResolvedStep
from samrepro.results import StepResult, utc_now
from samrepro.spec import StepSpec
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


def run_ablation(
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
    tracking_uri: str | None = None,
    force: bool = False,
    profile: bool = False,
    track: bool = True,
    command: str | None = None,
    workload: str = "points",
    workload_options: dict[str, int] | None = None,
) -> Outcome:
    """Run every step of `plan` on `model`/`device`, each in its own process; returns the StepResults.

    Args:
        plan: a Plan, a plan file, or a plan name in ablations/ (default: amg for the amg workload, else blog on
            cuda, cpu on cpu).
        patches: instead of a plan, fp32 then one step per patch; a patch that cannot run here is an error.
        batch_size: images per encoder batch (None: 8); the amg and interactive workloads run one image at a time.
        prompts: at most this many prompts per image (None: all).
        weights: "random", a checkpoint path, or None: tiny's shipped weights, random for the vit_* models.
        force: rerun steps whose results already exist.
        track: log the results folder to MLflow at the end.
        workload: "points" (the prompted workload), "amg" or "interactive" (workloads.py); workload_options: its
            options, e.g. {"points_per_side": 8} for amg.
    """
    ab = ablation.prepare(
        model, device, plan, patches, mode, batch_size, images, prompts, weights, data, results_dir, workload,
        workload_options,
    )  # fmt: skip
    folder, steps, setup, plan = ab.folder, ab.steps, ab.setup, ab.plan
    command = command or shlex.join(sys.argv)
    if setup["weights"] == "random" and model != "tiny":
        _say(f"WARNING: {model} with RANDOM weights: speed only, accuracy against ground truth is meaningless")
    with supervise.interruptible(), locked(folder, command):
        try:
            results.write_json(folder / results.PLAN_FILE, setup | {"command": command})
            set_aside_stale(folder, [filename(s) for s in steps])
            size = workloads.describe(setup["workload"], setup["batch_size"])
            _say(f"{plan.name} ({mode}) on {model}/{device}, {size}, {images} images -> {folder}")
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
        spec = ablation.step_spec(folder, step, setup, profile)
        kept = None if force else reusable(folder, step, spec)
        if kept is not None:
            _say(f"step {step.index:02d} {step.name}: kept ({kept.status}, results exist; --force reruns it)")
            out.append(kept)
            continue
        spec.write(folder / "specs" / filename(step))
        start = time.monotonic()
        if step.skip_reason:
            result = recorded(folder, spec.result(status="skipped", reason=step.skip_reason), capture_env=True)
        elif bad := config_error(step):
            result = recorded(folder, spec.result(reason=bad))
        else:
            result = _spawn(folder, step, spec, view)
            wall_s[step.name] = time.monotonic() - start
        base = next((r.img_s for r in out if r.index == 0 and r.status == "ok"), None)
        line = console.result_line(result, base)
        if result.status == "failed" and step.name in wall_s:
            line += f"; log: {folder / 'logs' / Path(filename(step)).with_suffix('.log')}"
        if step.name in wall_s:
            view.finish(line)
        else:
            _say(line)
        out.append(result)
    return out, wall_s


def reusable(folder: Path, step: ResolvedStep, spec: StepSpec) -> StepResult | None:
    """The existing result of this step when it answers the same spec: ok, or skipped for the same reason."""
    path, spec_path = folder / filename(step), folder / "specs" / filename(step)
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


def recorded(folder: Path, result: StepResult, capture_env: bool = False) -> StepResult:
    """The result of a step that ran no process, written now."""
    result.started_at = result.finished_at = utc_now()
    if capture_env:
        result.env = env.capture()
    results.write(result, folder)
    return result


def _spawn(folder: Path, step: ResolvedStep, spec: StepSpec, view: console.StepView) -> StepResult:
    """Run the step in a fresh process: its output to its log file, its phases to `view`; a crash without a
    result is recorded as failed with the log's last lines."""
    path = folder / filename(step)
    path.unlink(missing_ok=True)
    log_path = folder / "logs" / Path(filename(step)).with_suffix(".log")
    log_path.parent.mkdir(exist_ok=True)
    started = utc_now()
    view.start(f"step {step.index:02d} {step.name}", " + ".join(step.patches) or "fp32 baseline")
    name = f"step {step.index:02d} {step.name}"
    code = supervise.run_step(
        [*STEP_COMMAND, str(folder / "specs" / filename(step))],
        log_path,
        view,
        on_stop=lambda: view.finish(f"{name}: interrupted (its log: {log_path})"),
    )
    if path.is_file():
        return results.read(path)
    why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    result = spec.result(reason=f"step process {why} without writing a result", error=supervise.tail(log_path))
    result.started_at, result.finished_at = started, utc_now()
    results.write(result, folder)
    return result


@contextlib.contextmanager
def locked(folder: Path, command: str) -> Iterator[None]:
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


def set_aside_stale(folder: Path, current: list[str]) -> None:
    """Step results of steps no longer in the plan move to stale/, so reports only see this plan's steps."""
    for path in folder.glob("step_*.json"):
        if path.name not in current:
            (folder / "stale").mkdir(exist_ok=True)
            path.replace(folder / "stale" / path.name)
            _say(f"moved {path.name} (not a step of this plan) to {folder / 'stale'}")


def filename(step: ResolvedStep) -> str:
    return f"step_{step.index:02d}_{step.name}.json"
