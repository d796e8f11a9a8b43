"""Run a sweep: every ablation of the matrix prepared as `samrepro ablate` prepares one, its steps run as Ray tasks
(sweep_ray.py), their results stored here; then each ablation's report and MLflow runs, and the sweep's summary.

The sweep's folder holds one folder per ablation, laid out as `samrepro ablate` lays one out (so `samrepro report`
and `samrepro log` work on it, and either command resumes the other's), plus sweep.json, summary.md, the chart and
runner.lock. The driver holds the lock of the sweep's folder and of every ablation's. Results are written here, by
the driver, atomically: a worker needs no shared filesystem, and a step is either complete on disk or absent.
A rerun keeps every finished step and runs the rest; with nothing left to run it starts no Ray instance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samrepro import ablation, conclude, console, results, supervise, sweep_summary
from samrepro.ablation import Ablation
from samrepro.console import say
from samrepro.inputs import UsageError, config_error
from samrepro.plans import ResolvedStep
from samrepro.results import StepResult, utc_now
from samrepro.runner import Outcome, filename, locked, recorded, reusable, set_aside_stale
from samrepro.spec import StepSpec
from samrepro.step import BASELINE
from samrepro.supervise import Interrupted
from samrepro.sweep import Sweep

STEP_COMMAND: list[str] | None = None  # None: the worker's own `python -m samrepro.step`; tests put a stand-in here


@dataclass(frozen=True)
class Job:
    """A step that runs now, as a Ray task."""

    ablation: Ablation
    step: ResolvedStep
    spec: StepSpec

    @property
    def folder(self) -> Path:
        return self.ablation.folder

    @property
    def key(self) -> str:
        return f"{self.folder.name} step {self.step.index:02d} {self.step.name}"

    def fp32_img_s(self) -> float | None:
        """The ablation's fp32 throughput, for the speed-up in a result line; None until it is on disk."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            first = results.read(self.folder / filename(self.ablation.steps[0]))
            return first.img_s if first.status == "ok" else None
        return None


@dataclass
class SweepOutcome:
    results_dir: Path
    results: dict[str, list[StepResult]]  # ablation folder name -> its steps' results

    @property
    def exit_code(self) -> int:
        """As `samrepro ablate`'s, over every step of every ablation."""
        return Outcome(self.results_dir, [r for rs in self.results.values() for r in rs]).exit_code


def run_sweep(
    sweep: Sweep,
    results_dir: Path | None = None,
    ray_address: str | None = None,
    force: bool = False,
    track: bool = True,
    tracking_uri: str | None = None,
    command: str | None = None,
) -> SweepOutcome:
    """Run every ablation of `sweep`; bad input (of any ablation) is refused before anything is written."""
    root = Path(results_dir or sweep.results)
    command = command or shlex.join(sys.argv)
    ablations = _prepare(sweep, root)
    if sweep.weights == "random" and any(m != "tiny" for m in sweep.models):
        say("WARNING: vit_* models with RANDOM weights: speed only, accuracy against ground truth is meaningless")
    info: dict[str, Any] = {"sweep": sweep.to_dict(), "command": command, "started_at": utc_now()}
    with supervise.interruptible(), contextlib.ExitStack() as held:
        for folder in [root, *(ab.folder for ab in ablations)]:
            held.enter_context(locked(folder, command))
        try:
            results.write_json(root / "sweep.json", info)
            planned = [_steps(ab, sweep.profile, command, force) for ab in ablations]
            jobs, kept = [job for ran, _ in planned for job in ran], sum(k for _, k in planned)
            say(f"sweep {sweep.name}: {len(ablations)} ablation(s), {len(jobs)} step task(s), {kept} kept -> {root}")
            if jobs:
                info["ray"] = _run(jobs, sweep, ray_address)
        except Interrupted as e:
            e.results_dir = root
            raise
        info["finished_at"] = utc_now()
        done = {ab.folder.name: [results.read(ab.folder / filename(s)) for s in ab.steps] for ab in ablations}
        runs = {name: conclude.report_and_track(root / name, tracking_uri, track) for name in done}
        rows = [sweep_summary.row(ab, done[ab.folder.name]) for ab in ablations]
        say(f"sweep summary: {sweep_summary.write(root, info, rows)}")
        if track:
            conclude.track_sweep(root, info, {k: v for k, v in runs.items() if v}, tracking_uri)
    return SweepOutcome(root, done)


def _prepare(sweep: Sweep, root: Path) -> list[Ablation]:
    """Each cell's ablation, in the folder under `root` that `samrepro ablate` would name by default; a bad cell
    is named in the error."""
    out = []
    shared = {"images": sweep.images, "prompts": sweep.prompts, "weights": sweep.weights, "data": sweep.data}
    for cell in sweep.cells():
        which = {"patches": list(cell.patches)} if cell.patches else {"plan": cell.plan}
        try:
            ab = ablation.prepare(
                cell.model, cell.device, **which, mode=cell.mode, batch_size=cell.batch_size, **shared
            )
        except ValueError as e:  # UsageError, PlanError
            raise UsageError(f"{sweep.source}: {cell.label}: {e}") from None
        out.append(dataclasses.replace(ab, folder=root / ab.folder.name))
    names = [ab.folder.name for ab in out]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"{sweep.source}: two ablations would share a results folder: {', '.join(twice)}")
    return out


def _steps(ab: Ablation, profile: bool, command: str, force: bool) -> tuple[list[Job], int]:
    """Write the ablation's plan.json and specs, keep the steps that need not run again (as `samrepro ablate`
    does), record those that need no process; returns the rest as jobs, and how many were kept."""
    results.write_json(ab.folder / results.PLAN_FILE, ab.setup | {"command": command})
    set_aside_stale(ab.folder, [filename(s) for s in ab.steps])
    jobs, kept = [], 0
    for step in ab.steps:
        spec = ablation.step_spec(ab.folder, step, ab.setup, profile)
        if not force and reusable(ab.folder, step, spec) is not None:
            kept += 1
            continue
        spec.write(ab.folder / "specs" / filename(step))
        (ab.folder / filename(step)).unlink(missing_ok=True)  # a result of another spec is never read as this one's
        if step.skip_reason:
            result = recorded(ab.folder, spec.result(status="skipped", reason=step.skip_reason), capture_env=True)
        elif bad := config_error(step):
            result = recorded(ab.folder, spec.result(reason=bad))
        else:
            jobs.append(Job(ab, step, spec))
            continue
        say(f"{ab.folder.name} {console.result_line(result, None)}")
    return jobs, kept


def _run(jobs: list[Job], sweep: Sweep, address: str | None) -> dict[str, Any]:
    """Run the jobs on Ray, storing each outcome as it comes; returns where they ran."""
    try:
        from samrepro import sweep_ray
    except ImportError as e:
        raise UsageError(f"`samrepro sweep` needs Ray ({e}): pip install 'samrepro[ray]'") from None
    from samrepro.sweep_view import SweepView

    cluster = sweep_ray.connect(address)
    say(f"Ray at {cluster.address}; dashboard: {cluster.dashboard or 'not running'}")
    view = SweepView()

    def finish(job: Job, output: Any, baseline: bytes | None) -> None:
        if isinstance(output, dict):
            result = _store(job, output, baseline)
        else:
            reason, error = sweep_ray.failure(output, needs_baseline=job.step.index > 0)
            result = recorded(job.folder, job.spec.result(reason=reason, error=error))
        line = f"{job.folder.name} {console.result_line(result, job.fp32_img_s())}"
        view.finish(job.key, line, result.status == "failed")

    try:
        sweep_ray.check_resources(jobs, sweep.cpus_per_step)
        sweep_ray.run(jobs, sweep.cpus_per_step, sweep.retries, STEP_COMMAND, view, finish)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(signal.SIGINT) from None  # raised inside a Ray call, Interrupted comes out as a bare one
    finally:
        sweep_ray.disconnect(cluster)
    return {"address": cluster.address, "dashboard": cluster.dashboard}


def _store(job: Job, output: dict[str, Any], baseline: bytes | None) -> StepResult:
    """Write what the step's task brought back: its log, the fp32 baseline, traces, then its StepResult last."""
    name = filename(job.step)
    log = job.folder / "logs" / Path(name).with_suffix(".log")
    results.write_bytes(log, output["log"].encode())
    if baseline is not None:
        results.write_bytes(job.folder / BASELINE, baseline)
    for rel, data in output["files"].items():
        if rel != name:
            results.write_bytes(job.folder / rel, data)
    if name in output["files"]:
        results.write_bytes(job.folder / name, output["files"][name])
        return results.read(job.folder / name)
    code = output["code"]
    why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    result = job.spec.result(
        reason=f"step process {why} without writing a result ({output['host']})", error=supervise.tail(log)
    )
    result.started_at, result.finished_at = output["started_at"], output["finished_at"]
    results.write(result, job.folder)
    return result
