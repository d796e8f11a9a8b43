"""Report: verdict, table, banner, notes, published figures, regressions, charts, and byte-identical output."""

import json
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from samrepro import published, results
from samrepro.report import write_report
from samrepro.results import StepResult
from tests.conftest import PLAN_INFO

ENV = {
    "plan": {"name": "blog", "steps": []},
    "torch": "2.11.0",
    "gpu": None,
    "cpu": "Xeon",
    "git": {"commit": "abc123", "dirty": False},
    "data": "synthetic-val(seed=0, n=4)",
}
ABLATIONS = Path(__file__).parents[1] / "ablations"
A100 = "A100 (segment-anything-fast results CSV)"


def step(index, name, patches, **kw):
    base = dict(model="tiny", device="cpu", batch_size=2, step=name, index=index, patches=patches, status="ok")
    base |= dict(gate="pass", weights="random(seed=0)", plan="blog", plan_hash="h1", images=4, env=ENV)
    return StepResult(**(base | kw))


def write_results(folder):
    steps = [
        step(
            0,
            "fp32",
            [],
            gate="skipped",
            img_s=10.0,
            encoder_ms=90.0,
            peak_mem_mib=500.0,
            miou_agreement=1.0,
            compile_s=1.5,
            started_at="2026-01-01T00:00:00+00:00",
            finished_at="2026-01-01T00:00:50+00:00",
        ),
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
            compile_s=40.25,
            started_at="2026-01-01T00:01:00+00:00",
            finished_at="2026-01-01T00:02:15+00:00",
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


def test_report_opens_with_the_verdict(tmp_path):
    write_results(tmp_path / "res")
    lines = write_report(tmp_path / "res").read_text().splitlines()
    assert lines[2:7] == [
        "- **best step: `bf16`**, 25.0 img/s, 2.50x over fp32 (`fp32`, 10.0 img/s); best = highest img/s among "
        "steps whose gate passed, and the fp32 reference",  # int8 is faster but failed its gate
        "- **gates:** 1 passed, 1 failed, 3 skipped; failed: `int8`",
        "- **weights:** **RANDOM (`random(seed=0)`): accuracy against ground truth (mIoU GT) is meaningless**",
        "- **data:** `synthetic-val(seed=0, n=4)`; 4 images, batch size 2",
        "- **time:** 41.8 s compiling (sum of compile s), 2 min 5 s wall time of all steps (sum of each one's start "
        "to finish)",
    ]


def test_report_without_a_passing_step_or_fp32_says_so(tmp_path):
    results.write(step(0, "bf16", ["bf16"], gate="fail", img_s=5.0, weights="sam_vit_b.pth sha256:ab"), tmp_path)
    text = write_report(tmp_path).read_text()
    assert "- **best step: none** (no step passed its gate and no fp32 reference ran)" in text
    assert "- **weights:** `sam_vit_b.pth sha256:ab`\n" in text and "RANDOM" not in text


def test_tiny_has_one_no_published_figure_note(tmp_path):
    write_results(tmp_path / "res")
    text = write_report(tmp_path / "res").read_text()
    assert "## Published figures\n\nNo published figure (tiny is samrepro's own model).\n" in text
    assert text.lower().count("no published figure") == 1 and A100 not in text


def vit_b_results(folder, device="cuda", batch_size=8, mode="cumulative", log=None):
    """fp32 -> bf16 -> sync_free -> compile (slower than sync_free) -> sdpa on vit_b."""
    rates = {"fp32": 24.2, "bf16": 79.6, "sync_free": 80.0, "compile": 70.0, "sdpa": 120.0}
    names = list(rates)
    for i, name in enumerate(names):
        r = step(i, name, names[1 : i + 1], model="vit_b", device=device, batch_size=batch_size, mode=mode)
        r.img_s, r.encoder_ms, r.compile_s = rates[name], 40.0 - i, 90.5 if name == "compile" else 2.0
        r.gate = "skipped" if i == 0 else "pass"
        results.write(r, folder)
    info = PLAN_INFO | {"model": "vit_b", "device": device, "batch_size": batch_size, "mode": mode}
    (folder / "plan.json").write_text(json.dumps(info))
    if log is not None:
        (folder / "logs").mkdir()
        (folder / "logs" / "step_03_compile.log").write_text(log)


def table_rows(text, section):
    """Rows of the first table under `## section`, by their first cell (a list per name)."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("| step |"):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), []).append(line)
    return rows


def test_vit_b_steps_beside_their_published_figures_and_ratios(tmp_path):
    vit_b_results(tmp_path)
    text = write_report(tmp_path).read_text()
    rows = table_rows(text, "Published figures")
    # measured 79.6 img/s = 3.29x fp32; A100 bf16 at bs8: 39.8 img/s = 39.8/12.1 = 3.29x fp32, mIoU 0.5416
    assert rows["bf16"] == [f"| bf16 | 79.6 | 3.29x | {A100} | 8 | 39.8 | 3.29x | 0.5416 | 2.00 | 1.00 |"]
    # compile: 70.0/54.7 = 1.28 of the img/s; 2.89x / (54.7/12.1 = 4.52x) = 0.64 of the speed-up
    assert rows["compile"] == [f"| compile | 70.0 | 2.89x | {A100} | 8 | 54.7 | 4.52x | 0.5408 | 1.28 | 0.64 |"]
    assert "no published figure: the published bf16 step already includes the sync removal" in rows["sync_free"][0]
    assert len(rows["sdpa"]) == 1  # a GPU run is not set beside the Intel blog's CPU ratio
    assert "nearest this run's 8" in text and "speed-up ratio compares what each step gains" in text
    assert "segment-anything-fast/tree/main/experiments/p4d_results>" in text


def test_published_figures_at_the_nearest_batch_size_and_by_device():
    assert [f.batch_size for f in published.figures("compile", "vit_b", 4, "cuda")] == [1]  # 1 is 3 away, 8 is 4
    assert [f.batch_size for f in published.figures("compile", "vit_b", 20, "cuda")] == [32]  # ties: the larger
    assert [f.batch_size for f in published.figures("batched_decoder", "vit_b", 1)] == [8]  # no bs1 row
    (bs32,) = published.figures("compile", "vit_b", 32, "cuda")
    assert (bs32.img_s, bs32.miou, bs32.speedup) == (50.1, 0.5408, None)  # fp32 at bs32 has no figure
    assert [(f.hardware.split()[0], f.speedup) for f in published.figures("compile", "vit_h", 16, "cpu")] == [
        ("Intel", 3.95)
    ]  # the whole stack, the CPU plan's last step
    assert published.figures("sdpa", "vit_h", 16, "cpu") == []
    assert [(f.hardware.split()[0], f.batch_size) for f in published.figures("sdpa", "vit_h", 16, "cuda:0")] == [
        ("A100", 8)
    ]  # bs8 is nearer 16
    assert published.figures("sdpa", "vit_l", 8) == [] and published.figures("sync_free", "vit_b", 8) == []


def test_published_data_names_only_plan_steps():
    plan_steps = {
        s["name"] for p in ("blog", "cpu") for s in tomllib.loads((ABLATIONS / f"{p}.toml").read_text())["steps"]
    }
    for name, src in published.sources().items():
        assert src["hardware"] and src["url"].startswith("https://") and src["device"] in ("cuda", "cpu"), name
        for model in ("vit_b", "vit_h"):
            for bs, rows in src[model].items():
                assert set(rows) <= plan_steps, (name, model, bs)
    assert set(published.load()["unmeasured"]) <= plan_steps


def test_a_slower_step_is_flagged_with_what_its_log_says(tmp_path):
    log = "warm-up\nW autotune: mm 8x768 picked triton\nplain\nrecompile: shape changed\nfallback to aten\n"
    vit_b_results(tmp_path, device="cpu", log=log)
    text = write_report(tmp_path).read_text()
    steps = table_rows(text, "Steps")
    assert "| 70.0 ▼ |" in steps["compile"][0]
    assert all("▼" not in steps[s][0] for s in ("fp32", "bf16", "sync_free", "sdpa"))
    regressions = text.split("## Regressions\n", 1)[1].split("\n## ", 1)[0]
    assert "### `compile`: 70.0 img/s, 12.5% below `sync_free` (80.0 img/s)" in regressions
    assert "- compile s: 90.5 (`sync_free`: 2.0)" in regressions
    assert "- encoder ms: 37.00 (`sync_free`: 38.00, -2.6%)" in regressions
    quoted = regressions.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert quoted == ["W autotune: mm 8x768 picked triton", "recompile: shape changed", "fallback to aten"]
    assert "the last 3 of 3 lines" in regressions and "### `sdpa`" not in regressions


@pytest.mark.parametrize("mode", ["cumulative", "isolated"])
def test_regressions_need_cumulative_mode_and_say_when_there_is_no_log(tmp_path, mode):
    vit_b_results(tmp_path, mode=mode)
    text = write_report(tmp_path).read_text()
    if mode == "isolated":
        assert "▼" not in text and "## Regressions" not in text
        assert "The published figures are cumulative (each step on top of the ones before); this run is not." in text
    else:
        assert "- no log `logs/step_03_compile.log` in the results folder" in text


def test_no_regressions_section_when_every_step_is_faster(tmp_path):
    write_results(tmp_path / "res")  # the failed and skipped steps between bf16 and int8 are not compared
    text = write_report(tmp_path / "res").read_text()
    assert "▼" not in text and "## Regressions" not in text


def test_a_small_encoder_share_and_emulated_bf16_are_named_as_limits(tmp_path):
    no_bf16 = ENV | {"cpu_bf16": False, "cpu_capability": "AVX512"}
    results.write(step(0, "fp32", [], gate="skipped", img_s=34.0, encoder_ms=8.0, env=no_bf16), tmp_path)
    results.write(step(1, "bf16", ["bf16"], img_s=37.0, encoder_ms=10.6, env=no_bf16), tmp_path)
    text = write_report(tmp_path).read_text()
    limits = text.split("## What limits the speed-ups\n\n")[1].split("\n\n")[0].splitlines()
    assert limits[0].startswith("- **The image encoder is 27% of the time per image** in `fp32` (8.0 of 29.4 ms)")
    assert "at most 1.37x from them" in limits[0]
    assert limits[1].startswith("- **This CPU has no bf16 instructions**") and "ATen's vector ISA: AVX512" in limits[1]


def test_steps_past_the_encoder_bound_are_named_with_their_time_outside_the_encoder(tmp_path):
    """A 2-core run where fp32 and sdpa met a busier machine than compile: compile's 1.51x is past the 1.28x that an
    encoder patch could reach, and the report says where the time went instead of leaving the two side by side."""
    results.write(step(0, "fp32", [], gate="skipped", img_s=26.67, encoder_ms=8.16), tmp_path)
    results.write(step(1, "sdpa", ["sdpa"], img_s=26.19, encoder_ms=6.51), tmp_path)
    results.write(step(2, "compile", ["sdpa", "compile"], img_s=40.35, encoder_ms=6.03), tmp_path)
    text = write_report(tmp_path).read_text()
    limit = text.split("## What limits the speed-ups\n\n")[1].split("\n\n")[0]
    assert "at most 1.28x from them" in limit
    assert "against `fp32`'s 29.3 ms: `compile` 1.51x (18.8 ms)." in limit and "`sdpa`" not in limit


def test_no_limit_section_where_the_encoder_dominates_and_bf16_is_native(tmp_path):
    native = ENV | {"cpu_bf16": True}
    results.write(step(0, "fp32", [], gate="skipped", img_s=10.0, encoder_ms=90.0, env=native), tmp_path)
    results.write(step(1, "bf16", ["bf16"], img_s=25.0, encoder_ms=30.0, env=native), tmp_path)
    assert "What limits" not in write_report(tmp_path).read_text()
