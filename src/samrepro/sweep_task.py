"""One sweep step on a Ray worker: the step's spec and the fp32 baseline in, its files and log out.

The worker needs no shared filesystem with the driver: the step runs as `python -m samrepro.step` (a fresh
process, as in `samrepro ablate`) in a temporary folder, with the worker's own model/data cache, and what it wrote
comes back as bytes for the driver to store. The GPU is the one Ray gave the task (CUDA_VISIBLE_DEVICES, inherited),
and the step's CPU threads follow Ray's OMP_NUM_THREADS. The step dies with the worker (PR_SET_PDEATHSIG), so a
killed worker leaves no step holding its GPU.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from samrepro import supervise
from samrepro.checkpoints import cache_root
from samrepro.results import utc_now
from samrepro.step import BASELINE

SPEC, LOG = "spec.json", "step.log"


class Relay:
    """Hands the step's phase events to the driver's progress queue, tagged with the step's key."""

    def __init__(self, key: str, queue: Any) -> None:
        self.key, self.queue = key, queue

    def event(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress only: a lost event never fails the step
            self.queue.put_nowait((self.key, event))

    def tick(self) -> None:
        """supervise.relay's once-a-second call: nothing to refresh on a worker."""


def run_step(
    key: str, spec_text: str, baseline: bytes | None, command: list[str] | None, queue: Any
) -> tuple[dict[str, Any], bytes | None]:
    """Run one step; returns ({files, log, code, host, started_at, finished_at}, the baseline it wrote, if any).

    `files` holds every file the step wrote under its folder (its StepResult JSON, traces), by relative path.
    `command` replaces `python -m samrepro.step` (tests substitute a stand-in).
    """
    host, relay = platform.node(), Relay(key, queue)
    relay.event({"phase": "started", "host": host})
    with tempfile.TemporaryDirectory(prefix="samrepro-step-") as tmp:
        folder = Path(tmp)
        spec = json.loads(spec_text) | {"results_dir": tmp, "cache_dir": str(cache_root())}
        (folder / SPEC).write_text(json.dumps(spec))
        if baseline is not None:
            (folder / BASELINE).write_bytes(baseline)
        started = utc_now()
        cmd = [*(command or [sys.executable, "-m", "samrepro.step"]), str(folder / SPEC)]
        code = supervise.run_step(cmd, folder / LOG, relay)  # a cancelled task stops it
        inputs = {folder / SPEC, folder / LOG, folder / BASELINE}
        wrote = [p for p in folder.rglob("*") if p.is_file() and p not in inputs]
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in wrote}
        made = folder / BASELINE if spec["index"] == 0 and (folder / BASELINE).is_file() else None
        log = (folder / LOG).read_text(errors="replace")
        out = {"files": files, "log": log, "code": code, "host": host, "started_at": started, "finished_at": utc_now()}
        return out, made.read_bytes() if made else None
