"""`samrepro sweep`: sweep files refused with one line, and on a local Ray instance a tiny CPU sweep end to end,
resumed without a task, logged to MLflow, and completed after killed workers without losing a finished step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from samrepro import cli, lock, plans, runner, sweep, sweep_run, sweep_view
from samrepro.results import read, read_all
from samrepro.sweep import SweepError

PLAN = """
name = "two"
[[steps]]
name = "fp32"
[[steps]]
name = "sync_free"
add = ["sync_free"]
[[steps]]
name = "ghost"
add = ["no_such_patch"]
"""
SWEEP = """
name = "tiny-e2e"
models = ["tiny"]
devices = ["cpu"]
plans = ["{plan}"]
patches = [["sdpa"]]
batch_sizes = [1, 2]
images = 2
weights = "random"
"""
FOLDERS = [f"tiny-cpu-{p}-cumulative-bs{b}" for p in ("two", "patches-sdpa") for b in (1, 2)]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_shipped_sweeps_parse():
    tiny = sweep.load(sweep.find_sweep("tiny-cpu"))
    assert [(c.plan, c.patches, c.batch_size) for c in tiny.cells()] == [
        ("cpu", None, 1), ("cpu", None, 4), (None, ("sync_free", "sdpa"), 1), (None, ("sync_free", "sdpa"), 4)
    ]  # fmt: skip
    cuda = sweep.load(sweep.find_sweep("vit_b-cuda"))
    assert {(c.device, c.plan, c.batch_size) for c in cuda.cells()} == {
        ("cuda", p, b) for p in ("blog", "beyond") for b in (8, 16)
    }
    assert cuda.results == Path("results/sweeps/vit_b-cuda") and cuda.weights == "random"


MATRIX = "models=['tiny']\ndevices=['cpu']\nbatch_sizes=[1]\n"
CPU_PLAN = plans.shipped_plans_dir() / "cpu.toml"  # named "cpu", as the shipped plan's name is


@pytest.mark.parametrize(
    "text, message",
    [
        (MATRIX + "plans=['cpu']\ncolour='red'", "unknown key(s) ['colour']; valid: ['batch_sizes', "),
        (MATRIX.replace("tiny", "vit_z") + "plans=['cpu']", "unknown models ['vit_z']; valid: tiny"),
        (MATRIX.replace("'cpu'", "'cuda:1'") + "plans=['cpu']", "no cuda:N"),
        (MATRIX.replace("[1]", "[64]") + "plans=['cpu']", "batch size 64 > images 32"),
        (MATRIX.replace("[1]", "[1, 1]") + "plans=['cpu']", "batch_sizes lists a value twice"),
        (MATRIX, "missing or empty plans or patches"),
        (MATRIX + "plans=['nope']", "unknown plan 'nope'; valid: "),
        (MATRIX + "plans=['cpu']\nimages='8'", "images must be an integer, got '8'"),
        (MATRIX + "patches=[['sync_free'], ['nope']]", "tiny cpu patches nope cumulative batch 1: unknown patch"),
        (MATRIX + f"plans=['cpu', '{CPU_PLAN}']", "would share a results folder: tiny-cpu-cpu-cumulative"),
        ("models=['tiny'", "not valid TOML"),
    ],
)
def test_bad_sweep_file_one_line_exit_2(capsys, tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out, err = run(capsys, "sweep", str(path), "--results", str(tmp_path / "r"), "--no-track")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message in err and str(path) in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_unknown_sweep_name_lists_the_shipped_ones():
    with pytest.raises(SweepError, match="unknown sweep 'nope'; valid: .*tiny-cpu"):
        sweep.find_sweep("nope")


def test_progress_counts_the_tasks_and_estimates_what_is_left(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(sweep_view.time, "monotonic", lambda: now[0])
    view = sweep_view.SweepView(live=False)
    for key in "abcd":
        view.queued(key)
    view.event("a", {"phase": "started", "host": "node1"})
    view.event("b", {"phase": "started", "host": "node1"})
    assert view.counts() == "tasks: 2 queued, 2 running, 0 done, 0 failed"  # no ETA before a task has finished
    now[0] = 10.0
    view.finish("a", "a: 1 img/s", failed=False)
    view.event("c", {"phase": "started", "host": "node2"})
    view.event("b", {"phase": "timing", "done": 1, "total": 2})
    assert view.phase["b"] == "timing 1/2 images"
    # a took 10 s: d needs 10 s, b (10 s in) about nothing more, c (just started) 10 s; over 2 running slots
    assert view.counts() == "tasks: 1 queued, 2 running, 1 done, 0 failed, ETA 10s"
    view.event("a", {"phase": "timing"})  # a late event of a finished task changes nothing
    assert "1 done" in view.counts()


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance of 2 CPUs; its workers inherit a fresh samrepro cache and one thread each."""
    ray = pytest.importorskip("ray")
    env, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMREPRO_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("OMP_NUM_THREADS", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()
    os.environ.clear()  # ray.init leaves variables and a SIGTERM handler behind; the tests after this one get neither
    os.environ.update(env)
    signal.signal(signal.SIGTERM, sigterm)


@pytest.fixture(scope="module")
def swept(local_ray, tmp_path_factory):
    """Two plans x two batch sizes of the tiny model, run for real by `samrepro sweep`."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "two.toml").write_text(PLAN)
    (root / "sweep.toml").write_text(SWEEP.format(plan=root / "two.toml"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        code = cli.main(["sweep", "sweep.toml", "--results", "out", "--no-track"])
    return root / "sweep.toml", root / "out", code


def fake_step(monkeypatch, tmp_path: Path, body: str) -> Path:
    """The step process replaced: it logs its pid and spec and runs `body`, writing no result."""
    calls = tmp_path / "calls.txt"
    script = f"import os, sys, time; open({str(calls)!r}, 'a').write(f'{{os.getpid()}} {{sys.argv[1]}}\\n'); {body}"
    monkeypatch.setattr(sweep_run, "STEP_COMMAND", [sys.executable, "-c", script])
    return calls


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("*/step_*.json"))}


def test_a_sweep_writes_each_ablation_as_samrepro_ablate_would(swept, monkeypatch, tmp_path):
    _, out, code = swept
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(FOLDERS)
    for name in FOLDERS:
        folder = out / name
        rows = read_all(folder)
        assert [r.status for r in rows] == (["ok", "ok", "skipped"] if "two" in name else ["ok", "ok"])
        assert rows[1].gate == "pass" and rows[1].miou_agreement == 1.0 and rows[1].images == 2
        assert (folder / "baseline.pt").is_file() and (folder / "report" / "report.md").is_file()
        assert {p.name for p in (folder / "logs").iterdir()} == {"step_00_fp32.log", f"step_01_{rows[1].step}.log"}
    info = json.loads((out / "sweep.json").read_text())
    assert [row["folder"] for row in info["ablations"]] == FOLDERS and info["ray"]["address"]
    summary = (out / "summary.md").read_text()
    assert summary.count("| tiny | cpu |") == 4 and (out / "throughput.png").is_file()
    # `samrepro ablate` on a sweep's folder keeps every step: the same specs, the same layout
    calls = tmp_path / "ablate-calls.txt"
    monkeypatch.setattr(runner, "STEP_COMMAND", [sys.executable, "-c", f"open({str(calls)!r}, 'a').write('x')"])
    again = runner.run_ablation("tiny", "cpu", patches=["sdpa"], batch_size=2, images=2, weights="random",
                                results_dir=out / FOLDERS[3], track=False)  # fmt: skip
    assert again.exit_code == 0 and not calls.exists()


def test_a_rerun_starts_no_task_and_logs_to_mlflow(swept, monkeypatch, tmp_path, capsys):
    from mlflow import MlflowClient

    from samrepro.tracking import SWEEP_EXPERIMENT, SWEEP_TAG

    sweep_file, out, _ = swept
    before = snapshot(out)
    calls = fake_step(monkeypatch, tmp_path, "sys.exit(3)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(sweep_file.parent)
    code, _, err = run(capsys, "sweep", str(sweep_file), "--results", str(out), "--tracking-uri", uri)
    assert code == 0 and not calls.exists() and "0 step task(s), 10 kept" in err
    assert snapshot(out) == before
    client = MlflowClient(uri)
    (run_,) = client.search_runs([client.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id])
    ablation_runs = json.loads(run_.data.tags["samrepro.ablation_runs"])
    assert sorted(ablation_runs) == sorted(FOLDERS) and run_.data.metrics["steps_ok"] == 8
    assert {client.get_run(i).data.tags[SWEEP_TAG] for i in ablation_runs.values()} == {run_.info.run_id}


def test_a_folder_in_use_is_refused(swept, capsys):
    sweep_file, out, _ = swept
    with lock.FolderLock(out / FOLDERS[2]) as held:
        held.acquire("samrepro ablate ...")
        code, _, err = run(capsys, "sweep", str(sweep_file), "--results", str(out), "--no-track")
    assert code == 2 and err.count("\n") == 1 and f"{FOLDERS[2]} is in use by another samrepro runner" in err


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_killed_workers_are_recorded_as_failed_and_a_rerun_completes_them(swept, monkeypatch, tmp_path):
    sweep_file, out, _ = swept
    folder = shutil.copytree(out, tmp_path / "out", ignore=shutil.ignore_patterns("runner.lock"))
    a, b = folder / FOLDERS[0], folder / FOLDERS[3]  # a loses its sync_free step, b everything
    (a / "step_01_sync_free.json").unlink()
    for path in [b / "step_00_fp32.json", b / "step_01_sdpa.json", b / "baseline.pt"]:
        path.unlink()
    kept = snapshot(folder)
    # each step process kills the Ray worker running it, then waits to be killed with it
    calls = fake_step(monkeypatch, tmp_path, "os.kill(os.getppid(), 9); time.sleep(120)")
    monkeypatch.chdir(sweep_file.parent)
    assert cli.main(["sweep", str(sweep_file), "--results", str(folder), "--no-track"]) == 1
    assert {k: v for k, v in snapshot(folder).items() if k in kept} == kept  # nothing finished lost
    waiting = read(b / "step_01_sdpa.json")
    for r in (read(a / "step_01_sync_free.json"), read(b / "step_00_fp32.json")):
        assert r.status == "failed" and r.reason.startswith("Ray task failed: WorkerCrashedError")
    assert waiting.status == "failed" and "the fp32 step's task failed (WorkerCrashedError)" in waiting.reason
    pids, specs = zip(*(line.split() for line in calls.read_text().splitlines()))
    pids = [int(p) for p in pids]
    assert len(pids) == 2  # the step waiting on the lost baseline never started
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)  # no step outlives its worker
    for spec in specs:  # the killed tasks' folders: no task was left to remove them
        shutil.rmtree(Path(spec).parent)
    monkeypatch.setattr(sweep_run, "STEP_COMMAND", None)
    assert cli.main(["sweep", str(sweep_file), "--results", str(folder), "--no-track"]) == 0
    assert [r.status for r in read_all(b)] == ["ok", "ok"] and read(a / "step_01_sync_free.json").gate == "pass"
    assert os.path.getsize(b / "baseline.pt") > 0
