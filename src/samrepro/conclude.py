"""After the steps: the summary a user judges the run by, then the report and the MLflow runs."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samrepro import console
from samrepro.console import say
from samrepro.inputs import first_line
from samrepro.results import StepResult, baseline
from samrepro.speed_limits import speed_limits


def summary(step_results: list[StepResult], wall_s: dict[str, float]) -> None:
    """The summary table and the totals a user needs to judge the run."""
    console.summary(step_results, wall_s)
    warm = sum(r.compile_s or 0.0 for r in step_results if r.step in wall_s)
    failed = [r.step for r in step_results if r.status == "failed" or r.gate == "fail"]
    ran = f"{len(wall_s)} step process(es) ran in {sum(wall_s.values()):.0f}s, {warm:.0f}s of it compiling/warming up"
    say(ran + (f"; FAILED: {', '.join(failed)}" if failed else "; every gate passed"))
    for limit in speed_limits(step_results, baseline(step_results)):
        say(f"limit: {limit.line} (report: What limits the speed-ups)")


def report_and_track(folder: Path, tracking_uri: str | None, track: bool) -> str | None:
    """The report, then tracking; neither can lose results, so neither fails the run. Returns the MLflow parent
    run's id, None where nothing was logged."""
    try:
        from samrepro import report

        say(f"report: {report.write_report(folder)}")
    except Exception as e:  # the JSONs are the truth; the report can be rebuilt
        if not isinstance(e, ImportError):
            traceback.print_exc()
        say(f"report not written ({type(e).__name__}: {e}); run `samrepro report {folder}` later")
    if not track:
        return None
    later = f"results kept in {folder}; run `samrepro log {folder}` later"
    return _tracked(later, "parent run", lambda tracking: tracking.log_results_dir(folder, tracking_uri), tracking_uri)


def track_sweep(folder: Path, info: dict[str, Any], ablation_runs: dict[str, str], tracking_uri: str | None) -> None:
    """The sweep's own MLflow run, linked to its ablations' parent runs; a failure only says so."""
    later = f"sweep summary kept in {folder}"
    _tracked(later, "sweep run", lambda t: t.log_sweep(folder, info, ablation_runs, tracking_uri), tracking_uri)


def _tracked(later: str, what: str, log: Callable[[Any], str], tracking_uri: str | None) -> str | None:
    """`log(tracking module)`'s run id, announced; None with a line saying why when MLflow cannot be used."""
    try:
        from samrepro import tracking
    except ImportError as e:
        say(f"{later} (tracking unavailable: {e})")
        return None
    try:
        run_id = log(tracking)
    except tracking.TrackingUnavailable as e:
        say(f"{later} ({e})")
        return None
    except Exception as e:  # any other MLflow failure: the results on disk still stand
        say(f"{later} (MLflow failed: {type(e).__name__}: {first_line(str(e))})")
        return None
    store = tracking_uri or tracking.default_tracking_uri(Path.cwd())
    say(f"MLflow: {what} {run_id} in {store}; browse it with `samrepro ui` (or `nox -s ui`)")
    return run_id
