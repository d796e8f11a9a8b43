"""The step process's supervision: its environment, its phase events, its death with the runner, and the signals
that stop it without losing a finished result."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import samrepro
from samrepro import console

STOP_GRACE_S = 10  # an interrupted step process gets this long to end after SIGTERM, then SIGKILL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TAIL_LINES = 40  # lines of a crashed step's log kept in its result
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the runner; finished steps are on disk and a rerun resumes."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.results_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shells' convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        kept = f"; finished steps are kept in {self.results_dir}" if self.results_dir else ""
        return f"interrupted by {signal.Signals(self.signum).name}{kept}"


def step_env(events_fd: int) -> dict[str, str]:
    """The step's environment: this one, minus the inductor cache that importing torchao set here (the step picks
    samrepro's own unless the user chose one), plus the events pipe."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", console.EVENTS_FD: str(events_fd)}
    if samrepro.USER_INDUCTOR_CACHE is None:
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


def relay(fd: int, view: console.StepView) -> None:
    """Hand the step's phase events to the view until the step closes its end; tick the view once a second."""
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    view.event(json.loads(line))
        view.tick()


def run_step(cmd: list[str], log_path: Path, view: console.StepView, on_stop: Callable[[], None] | None = None) -> int:
    """Run a step process to its end: its output to `log_path`, its phase events to `view` (see `relay`); its exit
    code. Anything raised meanwhile (an interrupt, a cancelled task) stops the process first, then `on_stop` runs."""
    events, child_end = os.pipe()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_end,),
                env=step_env(child_end),
                preexec_fn=preexec(),
            )
        finally:
            os.close(child_end)  # the child holds its own copy: end of file when it exits
        with proc:
            try:
                relay(events, view)
                return proc.wait()
            except BaseException:  # the step goes too, without a result (a finished one stays)
                stop(proc)
                if on_stop:
                    on_stop()
                raise
            finally:
                os.close(events)


def tail(log_path: Path) -> str:
    with contextlib.suppress(OSError):
        return "".join(deque(log_path.open(errors="replace"), maxlen=TAIL_LINES))
    return ""


def die_with(runner_pid: int) -> None:
    """In the forked step process, before exec: the kernel kills it when the runner dies, kill -9 included.

    preexec_fn is unsafe only with threads holding locks at fork; the runner has none while steps run.
    """
    _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != runner_pid:  # the runner died before prctl took effect
        os._exit(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted, once: later ones are ignored while the step process is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a KeyboardInterrupt still stops the step process
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def preexec() -> object:
    """What Popen runs in the child before exec: die with this process (Linux), else nothing."""
    return functools.partial(die_with, os.getpid()) if _LIBC else None
