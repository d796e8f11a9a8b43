"""The sweep's steps as Ray tasks (the task itself is sweep_task.run_step); imported only by `samrepro sweep`.

Each task reserves what its step needs: `cpus_per_step` CPUs, plus one GPU for a CUDA step; Ray packs them onto
the machine or cluster and sets CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS to match. Within one ablation the
fp32 step's baseline (its second return value) is an argument of every later step, so Ray starts those once it
exists and moves it to their nodes; nothing else is ordered. A task whose worker dies is retried `retries` times
(Ray's max_retries), then recorded as failed by the driver; the steps waiting on a lost baseline fail with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.queue import Queue

from samrepro.inputs import UsageError
from samrepro.step import BASELINE
from samrepro.supervise import STOP_GRACE_S
from samrepro.sweep_task import run_step

if TYPE_CHECKING:
    from samrepro.sweep_run import Job
    from samrepro.sweep_view import SweepView

POLL_S = 1.0  # how often the driver collects finished tasks and progress events
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error messages


@dataclasses.dataclass
class Cluster:
    owned: bool  # connected here, so disconnected here (which stops a local instance started here)
    address: str
    dashboard: str | None


def connect(address: str | None) -> Cluster:
    """The Ray instance at `address` (or $RAY_ADDRESS), the one this process already uses, or a new local one
    (with its dashboard where ray[default] is installed)."""
    owned = not ray.is_initialized()
    sigterm = signal.getsignal(signal.SIGTERM)
    context = ray.init(address, ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ray.init's handler exits at once; the sweep stops its own way
    url = context.dashboard_url
    dashboard = f"http://{url}" if url and "://" not in url else url or None
    gcs = (getattr(context, "address_info", None) or {}).get("gcs_address")  # a Ray Client connection has none
    return Cluster(owned, gcs or str(address), dashboard)


def disconnect(cluster: Cluster) -> None:
    if cluster.owned:
        ray.shutdown()


def check_resources(jobs: list[Job], cpus_per_step: int) -> None:
    """Refuse a sweep whose tasks no node could ever run: Ray would otherwise wait for them forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus_per_step for r in nodes):
        raise UsageError(f"cpus_per_step {cpus_per_step}: no node of the Ray cluster has that many CPUs")
    if any(j.spec.device.startswith("cuda") for j in jobs) and not any(r.get("GPU", 0) >= 1 for r in nodes):
        raise UsageError("the sweep has CUDA steps but no node of the Ray cluster has a GPU")


def run(
    jobs: list[Job],
    cpus_per_step: int,
    retries: int,
    command: list[str] | None,
    view: SweepView,
    finish: Callable[[Job, dict[str, Any] | RayError, bytes | None], None],
) -> None:
    """Submit every job, then hand each outcome to `finish` as it comes: the task's output (and, for an fp32
    step, its baseline), or the Ray error that ended it. An interruption cancels what is still running."""
    queue = Queue(actor_options={"num_cpus": 0})  # progress events from the tasks; takes no CPU from steps
    pending: dict[ray.ObjectRef, tuple[Job, ray.ObjectRef]] = {}
    baselines: dict[Path, ray.ObjectRef | None] = {}  # per ablation folder
    task = ray.remote(run_step)
    for job in sorted(jobs, key=lambda j: j.step.index):  # each ablation's fp32 step first: the others take its output
        options = {
            "num_cpus": cpus_per_step,
            "num_gpus": 1 if job.spec.device.startswith("cuda") else 0,
            "max_retries": retries,
            "num_returns": 2,
            "name": job.key,  # as the dashboard lists it
        }
        if job.step.index == 0:
            baseline = None
        elif job.folder not in baselines:  # the fp32 step was kept: its stored baseline, if any
            path = job.folder / BASELINE
            baseline = baselines[job.folder] = ray.put(path.read_bytes()) if path.is_file() else None
        else:
            baseline = baselines[job.folder]
        spec = json.dumps(dataclasses.asdict(job.spec))
        out, made = task.options(**options).remote(job.key, spec, baseline, command, queue)
        if job.step.index == 0:
            baselines[job.folder] = made
        pending[out] = (job, made)
        view.queued(job.key)
    view.start()
    try:
        while pending:
            time.sleep(POLL_S)  # here, not inside ray.wait: a signal's exception reaches the caller as it was raised
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                job, made = pending.pop(ref)
                try:
                    output, baseline = ray.get([ref, made])
                except RayError as e:
                    finish(job, e, None)
                    continue
                finish(job, output, baseline)
            if size := queue.qsize():  # after the results: the tasks they made room for started since
                for key, event in queue.get_nowait_batch(size):
                    view.event(key, event)
            view.tick()
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # the task stops its step process and cleans up
        _, stuck = ray.wait(list(pending), num_returns=len(pending), timeout=STOP_GRACE_S + 2 * POLL_S)
        for ref in stuck:
            ray.cancel(ref, force=True)  # kills the worker; its step process dies with it
        raise
    finally:
        view.close()
        queue.shutdown(force=True)


def failure(error: RayError, needs_baseline: bool) -> tuple[str, str]:
    """Why a task ended without an output: one line, and the whole message."""
    cause = (error.cause if isinstance(error, RayTaskError) else None) or error  # what the task (or an input) raised
    whole = ANSI.sub("", str(error))
    if needs_baseline and cause is not error and isinstance(cause, RayError):
        return (
            f"not run: the fp32 step's task failed ({type(cause).__name__}), so there is no baseline to gate against",
            whole,
        )
    first = " ".join(ANSI.sub("", str(cause)).split()).removeprefix("(raylet) ").split(". ")[0][:300]
    return f"Ray task failed: {type(cause).__name__}: {first}", whole
