"""Interruption without loss and one runner per folder, with real `python -m samrepro.cli ablate` processes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samrepro import cli, results, runner
from samrepro.lock import LOCK_FILE, FolderLock, FolderLocked

PLAN = 'name = "two"\n[[steps]]\nname = "fp32"\n[[steps]]\nname = "sync_free"\nadd = ["sync_free"]\n'
FIRST, SECOND = "step_00_fp32.json", "step_01_sync_free.json"
STAND_IN = """
import json, sys
template, calls, spec_path = sys.argv[1:]
spec = json.load(open(spec_path))
open(calls, "a").write(spec_path + "\\n")
result = json.load(open(template)) | {k: spec[k] for k in ("step", "index", "patches")}
open(f"{spec['results_dir']}/step_{spec['index']:02d}_{spec['step']}.json", "w").write(json.dumps(result))
"""
TIMEOUT_S = 180  # a step process imports torch: slow on a loaded 2-core CI machine


def ablate_args(plan: Path, folder: Path) -> list[str]:
    common = ["--weights", "random", "--images", "2", "--batch-size", "2", "--no-track"]
    return ["ablate", "tiny", "cpu", "--plan", str(plan), "--results", str(folder), *common]


def start(tmp: Path, folder: Path) -> tuple[subprocess.Popen, Path]:
    """A runner in its own process; its stderr goes to a file (a full pipe would block it)."""
    log = folder.with_suffix(".stderr")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "samrepro.cli", *ablate_args(tmp / "two.toml", folder)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp,
            env=os.environ | {"OMP_NUM_THREADS": "1", "SAMREPRO_CACHE": str(tmp / "cache")},
        )
    return proc, log


def stand_in(monkeypatch, calls: Path, template: Path) -> Path:
    """Replace the step process with one that logs its call and writes `template` as its own ok result."""
    script = calls.with_suffix(".py")
    script.write_text(STAND_IN)
    monkeypatch.setattr(runner, "STEP_COMMAND", [sys.executable, str(script), str(template), str(calls)])
    return calls


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"runner exited ({proc.returncode}) or timed out before {what}:\n{log.read_text()}")
        time.sleep(0.05)


def step_processes(folder: Path) -> list[int]:
    """Pids of live `samrepro.step` processes working on `folder`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        if b"samrepro.step" in args and any(str(folder).encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


def gone(folder: Path) -> bool:
    deadline = time.monotonic() + 30
    while step_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not step_processes(folder)


@pytest.fixture(scope="module")
def sigint(tmp_path_factory):
    """A fresh sweep stopped by SIGINT as soon as its first step's JSON appears, as the next step starts."""
    tmp = tmp_path_factory.mktemp("interrupt")
    (tmp / "two.toml").write_text(PLAN)
    folder = tmp / "sigint"
    proc, log = start(tmp, folder)
    wait_for((folder / FIRST).is_file, proc, log, f"{FIRST} appeared")
    first = (folder / FIRST).read_bytes()
    proc.send_signal(signal.SIGINT)
    return tmp, folder, proc.wait(TIMEOUT_S), log.read_text(), first


@pytest.fixture
def env_vars(sigint, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAMREPRO_CACHE", str(sigint[0] / "cache"))


def rerun(tmp: Path, folder: Path) -> runner.Outcome:
    return runner.run_ablation(
        "tiny", "cpu", plan=tmp / "two.toml", batch_size=2, images=2, weights="random", results_dir=folder, track=False
    )


def test_sigint_keeps_finished_steps_and_says_how_to_resume(sigint, env_vars, monkeypatch, tmp_path):
    tmp, folder, code, log, first = sigint
    assert code == 130
    last = log.splitlines()[-1]
    assert last.startswith("samrepro: interrupted by SIGINT; finished steps are kept in ") and str(folder) in last
    assert last.endswith(shlex.join(["samrepro", *ablate_args(tmp / "two.toml", folder)]))
    assert (folder / FIRST).read_bytes() == first and results.read(folder / FIRST).status == "ok"
    assert not (folder / SECOND).exists()  # the step that was starting left nothing
    assert not step_processes(folder)  # and its process is gone
    assert (folder / LOCK_FILE).read_text() == ""  # released
    calls = stand_in(monkeypatch, tmp_path / "calls.txt", template=folder / FIRST)
    rerun(tmp, shutil.copytree(folder, tmp_path / "copy"))
    assert [Path(p).name for p in calls.read_text().split()] == [SECOND]  # the finished step is not redone


def test_sigterm_mid_step_and_a_second_runner_is_refused(sigint, env_vars, capsys):
    """While a runner works on a folder a second one is refused naming its pid; SIGTERM then stops the first."""
    tmp, done, _, _, first = sigint
    folder = shutil.copytree(done, tmp / "sigterm")
    proc, log = start(tmp, folder)
    wait_for(lambda: step_processes(folder), proc, log, "the second step's process started")
    assert cli.main(ablate_args(tmp / "two.toml", folder)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is in use by another samrepro runner (pid {proc.pid}, since " in err
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT_S) == 143
    assert log.read_text().splitlines()[-1].startswith("samrepro: interrupted by SIGTERM; finished steps are kept")
    assert (folder / FIRST).read_bytes() == first and not (folder / SECOND).exists()
    assert gone(folder)


def test_kill_9_loses_nothing_and_a_rerun_resumes_even_without_tracking(sigint, env_vars, monkeypatch, capsys):
    """The step dies with its runner; the rerun recovers the lock, keeps step 0, runs step 1, and keeps the
    results on disk while the tracking store is down (exit code unaffected)."""
    tmp, done, _, _, first = sigint
    folder = shutil.copytree(done, tmp / "kill9")
    proc, log = start(tmp, folder)
    wait_for(lambda: step_processes(folder), proc, log, "the second step's process started")
    proc.kill()
    assert proc.wait(TIMEOUT_S) == -signal.SIGKILL
    assert gone(folder)  # no orphan goes on writing into the folder
    assert (folder / FIRST).read_bytes() == first and not (folder / SECOND).exists()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind, but not held
    calls = stand_in(monkeypatch, tmp / "kill9-calls.txt", template=done / FIRST)
    capsys.readouterr()
    args = [a for a in ablate_args(tmp / "two.toml", folder) if a != "--no-track"]
    assert cli.main([*args, "--tracking-uri", "http://127.0.0.1:9"]) == 0  # nothing listens on the discard port
    err = capsys.readouterr().err
    assert f"WARNING: recovered a stale lock on {folder} from a runner that died (pid {proc.pid}" in err
    assert [Path(p).name for p in calls.read_text().split()] == [SECOND]
    assert (folder / FIRST).read_bytes() == first and results.read(folder / SECOND).status == "ok"
    tracking = [line for line in err.splitlines() if "tracking store" in line]
    assert len(tracking) == 1 and tracking[0].startswith(f"results kept in {folder}; run `samrepro log {folder}` later")


def test_temp_files_are_never_read_and_a_corrupt_result_is_rerun(sigint, env_vars, monkeypatch, tmp_path, capsys):
    tmp, done, _, _, first = sigint
    folder = shutil.copytree(done, tmp_path / "copy")
    (folder / ".tmp-k2j4.json").write_text(first.decode()[:100])  # a write cut short by kill -9
    assert [r.step for r in results.read_all(folder)] == ["fp32"]
    (folder / FIRST).write_bytes(first[: len(first) // 2])
    calls = stand_in(monkeypatch, tmp_path / "calls.txt", template=done / FIRST)
    outcome = rerun(tmp, folder)
    assert f"WARNING: {FIRST} is unreadable (" in capsys.readouterr().err
    assert [Path(p).name for p in calls.read_text().split()] == [FIRST, SECOND]  # step 0 counts as not done
    assert [r.status for r in outcome.results] == ["ok", "ok"]
    assert not list(folder.glob(".tmp-*"))


def test_lock_refuses_a_live_holder_and_recovers_a_dead_or_reused_pid(tmp_path):
    held = FolderLock(tmp_path)
    assert held.acquire("samrepro ablate a") is None
    with pytest.raises(
        FolderLocked, match=rf"in use by another samrepro runner \(pid {os.getpid()}, since .*: samrepro ablate a\)"
    ):
        FolderLock(tmp_path).acquire("samrepro ablate b")  # flock: a second open file conflicts, same process or not
    held.release()
    for pid in (_dead_pid(), 1):  # a pid that is gone, and one reused by an unrelated live process
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "started_at": "then", "command": "old"}))
        with FolderLock(tmp_path) as again:
            assert again.acquire("new")["pid"] == pid
        assert (tmp_path / LOCK_FILE).read_text() == ""


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
