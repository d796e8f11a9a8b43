"""What `samrepro sweep` shows while its tasks run: counts of tasks queued, running, done and failed with an ETA,
and the phase of each running step; a rich live display on a terminal, plain lines elsewhere (console.py's rule).

The ETA assumes the tasks still to come take as long as the finished ones did on average, spread over as many
slots as are running now; it appears once a task has finished.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.text import Text

from samrepro.console import CONSOLE, HEARTBEAT_S, PHASES, say


class SweepView:
    def __init__(self, live: bool | None = None) -> None:
        self.live = CONSOLE.is_terminal if live is None else live
        self.state: dict[str, str] = {}  # key -> queued | running | done | failed
        self.phase: dict[str, str] = {}  # running key -> what its step is doing
        self.since: dict[str, float] = {}  # running key -> when it started
        self.took: list[float] = []  # seconds of each finished task
        self.display: Live | None = None
        self.last_line = time.monotonic()

    def queued(self, key: str) -> None:
        self.state[key] = "queued"

    def start(self) -> None:
        if self.live:
            self.display = Live(get_renderable=self._render, console=CONSOLE, transient=True, refresh_per_second=2)
            self.display.start()

    def event(self, key: str, event: dict[str, Any]) -> None:
        """A step's phase event, relayed by its task; "started" when the task began on a worker."""
        phase = event.get("phase", "")
        if self.state.get(key) in ("done", "failed"):  # its result came first: it took less than a poll
            return
        if phase == "started":
            self.state[key], self.since[key] = "running", time.monotonic()
            self.phase[key] = f"started on {event.get('host', '?')}"
            if not self.display:
                say(f"{key}: {self.phase[key]}")
            return
        text = PHASES.get(phase, phase)
        if phase == "timing" and event.get("total"):
            text += f" {event.get('done', 0)}/{event['total']} images"
        self.phase[key] = text

    def finish(self, key: str, line: str, failed: bool) -> None:
        if key in self.since:
            self.took.append(time.monotonic() - self.since.pop(key))
        self.state[key] = "failed" if failed else "done"
        self.phase.pop(key, None)
        say(line)

    def tick(self) -> None:
        """Called about once a second: plain output repeats the counts every HEARTBEAT_S."""
        now = time.monotonic()
        if not self.display and now - self.last_line >= HEARTBEAT_S:
            self.last_line = now
            say(self.counts())

    def close(self) -> None:
        if self.display:
            self.display.stop()
            self.display = None

    def counts(self) -> str:
        n = {s: sum(v == s for v in self.state.values()) for s in ("queued", "running", "done", "failed")}
        eta = self.eta(n["queued"], n["running"])
        tail = f", ETA {_duration(eta)}" if eta is not None else ""
        return f"tasks: {n['queued']} queued, {n['running']} running, {n['done']} done, {n['failed']} failed{tail}"

    def eta(self, queued: int, running: int) -> float | None:
        if not self.took:
            return None
        mean, now = sum(self.took) / len(self.took), time.monotonic()
        left = queued * mean + sum(max(mean - (now - t), 0.0) for t in self.since.values())
        return left / max(running, 1)

    def _render(self) -> Group:
        now = time.monotonic()
        lines = [Text(self.counts(), style="bold")]
        lines += [Text(f"  {k}: {self.phase[k]} ({now - t:.0f}s)") for k, t in self.since.items() if k in self.phase]
        return Group(*lines)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s" if minutes else f"{s}s"
