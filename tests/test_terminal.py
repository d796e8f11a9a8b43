"""What the runner prints: phases from the step's pipe, its own output only in its log, result lines, a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from samrepro import conclude, console, runner
from samrepro.results import StepResult

PLAN = """
name = "two"
[[steps]]
name = "fp32"
[[steps]]
name = "sync_free"
add = ["sync_free"]
"""

# A stand-in step process: reports its phases on the runner's pipe, floods stdout and stderr with compiler-like
# noise, then writes a StepResult as the real step does (or dies without one when the spec's step is "sync_free"
# and CRASH is set).
STEP = """
import json, sys
from pathlib import Path
from samrepro import console, results
spec = json.loads(open(sys.argv[1]).read())
for phase in ("loading", "patching", "compiling"):
    console.emit(phase)
print("Autotune Choices Stats: " + "x" * 80)
print("E1204 Runtime error during autotuning: out of resource", file=sys.stderr)
for done in range(0, 5):
    console.emit("timing", done=done, total=4)
if spec["step"] == "sync_free" and {crash}:
    sys.exit(3)
r = results.StepResult(model="tiny", device="cpu", batch_size=2, step=spec["step"], index=spec["index"],
                       patches=spec["patches"], status="ok", gate="pass" if spec["index"] else "skipped",
                       weights="random(seed=0)", plan=spec["plan"], plan_hash=spec["plan_hash"],
                       img_s=10.0 * (spec["index"] + 1), compile_s=1.5, peak_mem_mib=100.0,
                       miou_agreement=None if spec["index"] == 0 else 1.0)
results.write(r, Path(spec["results_dir"]))
"""


def run(monkeypatch, tmp_path: Path, crash: bool) -> runner.Outcome:
    monkeypatch.setenv("SAMREPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "STEP_COMMAND", [sys.executable, "-c", STEP.format(crash=crash)])
    plan = tmp_path / "two.toml"
    plan.write_text(PLAN)
    return runner.run_ablation(
        "tiny", "cpu", plan=plan, batch_size=2, images=2, weights="random", results_dir=tmp_path / "r", track=False
    )


def test_phases_and_results_reach_the_terminal_and_compiler_output_only_the_log(monkeypatch, tmp_path, capsys):
    outcome = run(monkeypatch, tmp_path, crash=False)
    out, err = capsys.readouterr()
    assert outcome.exit_code == 0
    assert "Autotune" not in out + err and "out of resource" not in out + err
    log = (outcome.results_dir / "logs" / "step_01_sync_free.log").read_text()
    assert "Autotune Choices Stats" in log and "out of resource" in log
    lines = err.splitlines()
    start = lines.index("step 01 sync_free: sync_free")
    assert lines[start + 1 : start + 4] == [
        "step 01 sync_free loading data and model",
        "step 01 sync_free applying patches",
        "step 01 sync_free compiling and warming up",
    ]
    assert "step 01 sync_free timing 0/4 images" in lines and any(" timing 4/4 images, ETA 0s" in s for s in lines)
    assert "step 01 sync_free: 20.00 img/s, 2.00x fp32, peak 100 MiB, warm-up 2s, agreement 1.0000, gate PASS" in lines
    assert "summary" in err and "2 step process(es) ran in" in err and "every gate passed" in err


def test_a_crashed_step_prints_its_log_path_and_keeps_the_tail(monkeypatch, tmp_path, capsys):
    outcome = run(monkeypatch, tmp_path, crash=True)
    err = capsys.readouterr().err
    log = outcome.results_dir / "logs" / "step_01_sync_free.log"
    assert outcome.exit_code == 1
    assert f"step 01 sync_free: FAILED (step process exited with code 3 without writing a result); log: {log}" in err
    assert "FAILED: sync_free" in err
    crashed = outcome.results[1]
    assert "out of resource" in crashed.error  # the log's last lines, for the report


def test_plain_display_reminds_during_a_long_phase(monkeypatch, capsys):
    view = console.StepView(live=False)
    clock = iter([0.0, 0.0, 31.0, 31.5, 62.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    view.start("step 03 compile", "bf16 + compile")  # 0.0
    view.event({"phase": "compiling"})  # 0.0: printed
    view.tick()  # 31.0: a reminder
    view.tick()  # 31.5: too soon for another
    view.tick()  # 62.0: another
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "step 03 compile: bf16 + compile",
        "step 03 compile compiling and warming up",
        "step 03 compile compiling and warming up (31s in this phase)",
        "step 03 compile compiling and warming up (62s in this phase)",
    ]


def test_events_are_dropped_when_no_runner_listens(monkeypatch):
    monkeypatch.delenv(console.EVENTS_FD, raising=False)
    console.emit("loading")  # a step run by hand: nothing to write to, nothing raised


@pytest.mark.parametrize(
    "fields, line",
    [
        ({"status": "skipped", "reason": "needs CUDA"}, "step 02 sdpa: SKIPPED (needs CUDA)"),
        (
            {"status": "ok", "img_s": 5.0, "gate": "fail", "gate_violations": ["miou_agreement = 0.5, needs >= 0.9"]},
            "step 02 sdpa: 5.00 img/s, 0.50x fp32, gate FAIL: miou_agreement = 0.5, needs >= 0.9",
        ),
        (
            {
                "status": "ok",
                "img_s": 5.0,
                "gate": "pass",
                "amg_masks_per_image": 0.2,
                "amg_matched_miou": 0.5,
                "amg_match_share": 0.5,
                "amg_fp32_masks": 6,
            },
            "step 02 sdpa: 5.00 img/s, 0.50x fp32, 0.2 masks/image, matched mIoU 0.5000, 50% matched, "
            "masks not gated (fp32 kept 6, the gate needs 10), gate PASS",
        ),
    ],
)
def test_result_lines(fields, line):
    r = StepResult(model="tiny", device="cpu", batch_size=2, step="sdpa", index=2, patches=["sdpa"],
                   weights="w", **{"gate": "skipped", **fields})  # fmt: skip
    assert console.result_line(r, 10.0) == line


def test_emit_writes_one_json_line(monkeypatch, tmp_path):
    import os

    read, write = os.pipe()
    monkeypatch.setenv(console.EVENTS_FD, str(write))
    console.emit("timing", done=1, total=4)
    os.close(write)
    assert json.loads(os.read(read, 1024)) == {"phase": "timing", "done": 1, "total": 4}


def test_the_summary_names_what_limits_the_speed_ups(capsys):
    def result(index, name, patches, img_s, encoder_ms):
        return StepResult(model="tiny", device="cpu", batch_size=8, step=name, index=index, patches=patches,
                          weights="w", status="ok", gate="pass", img_s=img_s, encoder_ms=encoder_ms,
                          env={"cpu_bf16": False, "cpu_capability": "AVX512"})  # fmt: skip

    rows = [result(0, "fp32", [], 34.0, 8.0), result(1, "bf16", ["bf16"], 37.0, 10.6)]
    rows.append(result(2, "compile", ["bf16", "compile"], 48.0, 6.0))  # 1.41x: past what the encoder allows
    conclude.summary(rows, {"fp32": 17.0, "bf16": 13.0, "compile": 40.0})
    limits = [line for line in capsys.readouterr().err.splitlines() if line.startswith("limit: ")]
    assert limits == [
        "limit: the image encoder is 27% of fp32's time per image: encoder patches can gain at most 1.37x here; "
        "past it: compile 1.41x (their time outside the encoder changed) (report: What limits the speed-ups)",
        "limit: this CPU has no bf16 instructions (AVX512_BF16, AMX): bf16 steps are not expected to beat fp32 here "
        "(report: What limits the speed-ups)",
    ]
