"""Report: table, banner, notes, charts, and byte-identical output for the same inputs."""

import json
import xml.etree.ElementTree as ET

from samrepro import results
from samrepro.report import write_report
from samrepro.results import StepResult
from tests.conftest import PLAN_INFO

ENV = {
    "plan": {"name": "blog", "steps": []},
    "torch": "2.11.0",
    "gpu": None,
    "cpu": "Xeon",
    "git": {"commit": "abc123", "dirty": False},
}


def step(index, name, patches, **kw):
    base = dict(model="tiny", device="cpu", batch_size=2, step=name, index=index, patches=patches, status="ok")
    base |= dict(gate="pass", weights="random(seed=0)", plan="blog", plan_hash="h1", images=4, env=ENV)
    return StepResult(**(base | kw))


def write_results(folder):
    steps = [
        step(0, "fp32", [], gate="skipped", img_s=10.0, encoder_ms=90.0, peak_mem_mib=500.0, miou_agreement=1.0),
        step(
            1,
            "bf16",
            ["bf16"],
            img_s=25.0,
            latency_ms_p50=40.0,
            latency_ms_p90=45.5,
            encoder_ms=30.0,
            encoder_tflop_s=0.125,
            peak_mem_mib=300.0,
            miou_gt=0.51,
            miou_agreement=0.97,
            embedding_sqnr_db=float("inf"),
            tolerance={"agreement_miou_min": 0.9},
            kernel_paths={"sdpa.flash": 12},
        ),
        step(2, "compile", ["bf16", "compile"], status="skipped", gate="skipped", reason="needs CUDA"),
        step(
            3,
            "sdpa",
            ["bf16", "sdpa"],
            status="failed",
            gate="skipped",
            reason="RuntimeError: boom",
            error="Traceback (most recent call last):\nRuntimeError: boom",
        ),
        step(
            4,
            "int8",
            ["bf16", "int8_dynamic"],
            gate="fail",
            img_s=30.0,
            peak_mem_mib=250.0,
            miou_agreement=0.5,
            changes_weights=True,
            tolerance={"agreement_miou_min": 0.9},
            env=ENV | {"git": {"commit": "abc123", "dirty": True}},
            gate_violations=["agreement_miou 0.5000 < 0.9"],
        ),
    ]
    for r in steps:
        results.write(r, folder)
    plan = PLAN_INFO | {"command": ["samrepro", "ablate", "tiny", "cpu"]}
    (folder / "plan.json").write_text(json.dumps(plan))
    return steps


def test_report_contents_and_charts(tmp_path):
    write_results(tmp_path / "res")
    path = write_report(tmp_path / "res")
    assert path == tmp_path / "res" / "report" / "report.md"
    text = path.read_text()
    assert "random weights: ground-truth mIoU is meaningless" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert (
        "| bf16 | bf16 | ok | 25.0 | 2.50x | 40.00 | 45.50 | 30.00 | 3.00x | 0.125 | 300 | — | 0.5100 | 0.9700 | inf "
        "| pass |" in rows["bf16"]
    )
    assert "| skipped |" in rows["compile"] and rows["compile"].endswith("| needs CUDA |")
    assert "| failed |" in rows["sdpa"] and "RuntimeError: boom" in rows["sdpa"]
    assert "**FAIL**" in rows["int8"] and "agreement_miou 0.5000 < 0.9" in rows["int8"]
    assert "sdpa.flash=12" in rows["bf16"]
    assert "`int8` change weight values" in text
    assert "Speed-up is over the fp32 step `fp32`" in text
    assert "| torch | 2.11.0 |" in text and "| git.commit | abc123 |" in text
    assert "git.dirty | fp32: False" in text  # differs between steps
    assert "samrepro ablate tiny cpu" in text
    assert text.startswith("# samrepro report: blog (cumulative), tiny on cpu\n") and "| plan." not in text
    assert "<summary>sdpa</summary>" in text
    for stem in ("throughput", "memory"):
        assert (path.parent / f"{stem}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert ET.parse(path.parent / f"{stem}.svg").getroot().tag.endswith("svg")
        assert f"({stem}.svg)" in text


def test_report_is_deterministic(tmp_path):
    write_results(tmp_path / "res")
    a = write_report(tmp_path / "res", tmp_path / "a").parent
    b = write_report(tmp_path / "res", tmp_path / "b").parent
    for name in ("report.md", "throughput.svg", "memory.svg"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert "Date" not in (a / "memory.svg").read_text().split("</metadata>")[0].split("<metadata>")[-1]


def test_report_skips_a_corrupt_step_json_with_a_warning(tmp_path, capsys):
    write_results(tmp_path / "res")
    (tmp_path / "res" / "step_09_broken.json").write_text('{"model": "tiny", "trunc')
    text = write_report(tmp_path / "res").read_text()
    assert "| bf16 | bf16 | ok |" in text
    assert "skipping unreadable step result" in capsys.readouterr().err


def test_report_names_plan_steps_that_left_no_result(tmp_path):
    write_results(tmp_path / "res")
    info = json.loads((tmp_path / "res" / "plan.json").read_text())
    info["plan"] = {"name": "blog", "steps": [{"name": n} for n in ("fp32", "bf16", "compile", "sdpa", "int8", "late")]}
    (tmp_path / "res" / "plan.json").write_text(json.dumps(info))
    text = write_report(tmp_path / "res").read_text()
    assert "**Not run:** `late` of the plan left no StepResult" in text
