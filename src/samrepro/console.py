"""What the runner shows on the terminal: one line per step start and result, one live progress line, a summary.

A step process reports its phases as JSON lines on a pipe (`emit`); its own output (compiler logs, warnings) goes
to the step's log file only. On a terminal the progress line is a rich live display; elsewhere (CI, pipes) the
same phases come as plain lines, with a reminder every HEARTBEAT_S while a phase lasts.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from samrepro.amg_compare import MIN_GATED_MASKS, too_few_masks
from samrepro.results import StepResult

EVENTS_FD = "SAMREPRO_EVENTS_FD"  # the environment variable naming the step's end of the pipe
HEARTBEAT_S = 30.0
PHASES = {
    "loading": "loading data and model",
    "patching": "applying patches",
    "compiling": "compiling and warming up",
    "warming": "warming up",
    "timing": "timing",
    "gating": "comparing with fp32",
    "reference": "running fp32 with the same weight change (random weights)",
}

CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)


def say(line: str) -> None:
    CONSOLE.print(line, markup=False)


def emit(phase: str, **fields: Any) -> None:
    """In a step process: report a phase to the runner (nothing when run by hand)."""
    fd = os.environ.get(EVENTS_FD)
    if fd is None:
        return
    try:
        os.write(int(fd), (json.dumps({"phase": phase, **fields}) + "\n").encode())
    except OSError:  # the runner is gone; the step's result file still counts
        pass


class StepView:
    """The live line of the step that is running; `live=None` picks rich on a terminal, plain lines elsewhere."""

    def __init__(self, live: bool | None = None) -> None:
        self.live = CONSOLE.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.task: Any = None
        self.label, self.text, self.phase, self.since, self.last_line = "", "", "", 0.0, 0.0

    def start(self, label: str, what: str) -> None:
        say(f"{label}: {what}")
        self.label, self.phase, self.since = label, "", time.monotonic()
        if self.live:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=CONSOLE,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=None)

    def event(self, event: dict[str, Any]) -> None:
        phase, done, total = event.get("phase", ""), event.get("done"), event.get("total")
        now = time.monotonic()
        new = phase != self.phase
        if new:
            self.phase, self.since = phase, now
        self.text = f"{self.label} {PHASES.get(phase, phase)}"
        if phase == "timing" and total:
            eta = f", ETA {(now - self.since) / done * (total - done):.0f}s" if done else ""
            self.text += f" {done}/{total} images{eta}"
        if self.progress is not None:
            if new:
                self.progress.reset(self.task, total=total if phase == "timing" else None, description=self.text)
            self.progress.update(self.task, completed=done or 0, description=self.text)
        elif new or (phase == "timing" and done == total):
            self._plain(self.text, now)

    def tick(self) -> None:
        """Called about once a second: plain output says that a long phase is still going."""
        now = time.monotonic()
        if self.progress is None and self.phase and now - self.last_line >= HEARTBEAT_S:
            self._plain(f"{self.text} ({now - self.since:.0f}s in this phase)", now)

    def finish(self, line: str) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.phase = ""
        say(line)

    def _plain(self, line: str, now: float) -> None:
        self.last_line = now
        say(line)


def result_line(r: StepResult, fp32_img_s: float | None) -> str:
    head = f"step {r.index:02d} {r.step}:"
    if r.status != "ok":
        return f"{head} {r.status.upper()} ({r.reason})"
    parts = [f"{r.img_s:.2f} img/s"]
    if fp32_img_s and r.index:
        parts.append(f"{r.img_s / fp32_img_s:.2f}x fp32")
    if r.peak_mem_mib is not None:
        parts.append(f"peak {r.peak_mem_mib:,.0f} MiB")
    if r.compile_s is not None:
        parts.append(f"warm-up {r.compile_s:.0f}s")
    if r.amg_masks_per_image is not None:
        parts.append(f"{r.amg_masks_per_image:.1f} masks/image")
    if r.miou_agreement is not None:
        parts.append(f"agreement {r.miou_agreement:.4f}")
    if r.amg_matched_miou is not None:
        parts.append(f"matched mIoU {r.amg_matched_miou:.4f}, {r.amg_match_share:.0%} matched")
    if too_few_masks(r.amg_fp32_masks):
        parts.append(f"masks not gated (fp32 kept {r.amg_fp32_masks}, the gate needs {MIN_GATED_MASKS})")
    gate = r.gate.upper() if r.gate != "skipped" else "reference" if r.index == 0 else "skipped"
    parts.append(f"gate {gate}" + (f": {'; '.join(r.gate_violations)}" if r.gate_violations else ""))
    return f"{head} " + ", ".join(parts)


def summary(rows: list[StepResult], wall_s: dict[str, float]) -> None:
    """The table printed at the end of an ablation; `wall_s` is each step process's wall time (steps run now).
    For the AMG workload, agreement is the matched mIoU against the fp32 step's masks."""
    base = next((r.img_s for r in rows if r.index == 0 and r.status == "ok"), None)
    table = Table(title="summary", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("step", "status", "img/s", "vs fp32", "peak MiB", "warm-up s", "wall s", "agreement", "gate"):
        table.add_column(name, justify="left" if name in ("step", "status", "gate") else "right")
    for r in rows:
        table.add_row(
            f"{r.index:02d} {r.step}",
            r.status,
            _num(r.img_s, ".2f"),
            _num(r.img_s / base if r.img_s and base else None, ".2f", "x"),
            _num(r.peak_mem_mib, ",.0f"),
            _num(r.compile_s, ".0f"),
            _num(wall_s.get(r.step), ".0f") if r.step in wall_s else "kept",
            _num(r.amg_matched_miou if r.is_amg else r.miou_agreement, ".4f"),
            r.gate if r.status == "ok" else r.reason or r.status,
        )
    if not CONSOLE.is_terminal:
        CONSOLE.width = max(CONSOLE.width, 160)  # off a terminal rich assumes 80 columns and would wrap the table
    CONSOLE.print(table)


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"
