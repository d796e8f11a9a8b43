"""The interactive workload: each image embedded alone, then each prompt decoded alone; through the runner on the
tiny model and a CPU (step processes, gates, report, tracking), its clicks against the batched workload, and its
gate failing on a broken patch."""

from __future__ import annotations

import math

import pytest
import torch

from samrepro import ablation, bench, cli, interactive, report, results, runner, step, tracking, workloads
from samrepro.compare import Outputs, deviation
from samrepro.metrics import check_tolerance
from samrepro.patch import Tolerance
from samrepro.plans import parse
from tests.conftest import make_samples
from tests.test_gates_can_fail import _noisy_embeddings, broken

PLAN = {
    "name": "interactive-e2e",
    "steps": [
        {"name": "fp32"},
        {"name": "sync_free", "add": ["sync_free"]},
        {"name": "bf16", "add": ["bf16"]},
        {"name": "amg_postprocess", "add": ["amg_postprocess"]},  # only the generator runs it: skipped
    ],
}
SAMPLES = dict(seed=11, batch_size=3, max_prompts=3, boxes=False, multi_point=False)


@pytest.fixture(scope="module")
def clicked(tmp_path_factory, step_env):
    folder = tmp_path_factory.mktemp("interactive") / "results"
    return runner.run_ablation(
        "tiny", "cpu", plan=parse(PLAN), images=3, results_dir=folder, track=False, workload="interactive"
    )


@pytest.mark.slow
def test_steps_are_timed_per_click_and_gated(clicked):
    assert clicked.exit_code == 0
    base, sync, bf16, skipped = clicked.results
    assert [r.status for r in clicked.results] == ["ok", "ok", "ok", "skipped"]
    assert "only the automatic mask generator" in skipped.reason
    for r in (base, sync, bf16):
        assert r.workload == {"name": "interactive"} and r.batch_size == 1 and r.images == 3
        assert 0 < r.click_ms_p50 <= r.click_ms_p90 and r.click_ms_p50 < r.latency_ms_p50 <= r.latency_ms_p90
        assert r.encoder_ms > 0 and r.img_s > 0 and r.miou_gt is not None and r.prompts_per_image > 0
    assert base.gate == "skipped" and (clicked.results_dir / step.BASELINE).is_file()
    assert sync.miou_agreement == 1.0 and sync.embedding_sqnr_db == math.inf and sync.gate == "pass"
    assert set(bf16.tolerance) == set(workloads.WORKLOADS["points"].tolerance_keys)
    assert bf16.gate == "pass" and bf16.miou_agreement >= bf16.tolerance["agreement_miou_min"]


@pytest.mark.slow
def test_report_and_tracking_show_the_clicks(clicked):
    text = (clicked.results_dir / "report" / "report.md").read_text()
    assert report.INTERACTIVE_NOTE in text and "| click p50 ms | click p90 ms |" in text
    assert report.INTERACTIVE_SIZE in text and "not one click at a time" in text
    sync = tracking.step_runs(results.read_all(clicked.results_dir), {"data": "synthetic"})[1]
    assert sync.params["workload.name"] == "interactive"
    assert {"click_ms_p50", "click_ms_p90", "latency_ms_p50"} <= {k for k, _, _ in sync.metrics}


def test_clicks_give_the_batched_workloads_masks(tiny_ref):
    """One prompt at a time, the fp32 model's masks and IoU scores are those of an image's prompts decoded together
    (both keep the first image's embedding: batch size 1)."""
    samples = make_samples(**SAMPLES)
    one = interactive.run(tiny_ref, samples, warmup=0)
    together = bench.run(tiny_ref, samples, batch_size=1, warmup=0)
    measured = deviation(Outputs.of_bench(together), one.outputs())
    assert measured["miou_agreement"] == 1.0 and measured["embedding_sqnr_db"] == math.inf
    assert measured["iou_pred_max_abs"] < 1e-5 and measured["miou_gt_drop"] == pytest.approx(0.0, abs=1e-6)
    assert one.images == 3 and len(one.run.click_ms) == sum(s.num_prompts for s in samples)


def test_fewer_images_than_warm_up_runs_are_all_timed(tiny_ref):
    samples = make_samples(**SAMPLES)[:2]
    one = interactive.run(tiny_ref, samples, warmup=3)
    assert one.images == 2 and len(one.run.click_ms) == sum(s.num_prompts for s in samples)
    assert one.miou_gt is not None and [m.shape[0] for m in one.outputs().masks] == [s.num_prompts for s in samples]


def test_gate_fails_on_a_broken_patch(tiny_ref):
    samples = make_samples(**SAMPLES)
    ref = interactive.run(tiny_ref, samples, warmup=0).outputs()
    patch = broken("noisy", _noisy_embeddings, Tolerance(agreement_miou_min=0.0, embedding_sqnr_min_db=40.0))
    with patch.apply(tiny_ref):
        noisy = interactive.run(tiny_ref, samples, warmup=0).outputs()
    violations = check_tolerance(deviation(ref, noisy), patch.tolerance)
    assert any(v.startswith("embedding_sqnr_db") for v in violations), violations


def test_results_folder_is_named_by_the_workload():
    folder = ablation.default_results_dir("tiny", "cpu", "cpu", "cumulative", 1, {"name": "interactive"})
    assert folder.name == "tiny-cpu-cpu-cumulative-interactive"


def test_batch_size_is_refused_in_one_line(capsys):
    code = cli.main(["ablate", "tiny", "cpu", "--weights", "random", "--workload", "interactive", "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--batch-size applies to the points workload" in err


def test_profile_writes_a_trace(tiny_ref, tmp_path):
    interactive.profile(tiny_ref, make_samples(**SAMPLES), tmp_path / "t.json", tmp_path / "ops.txt", None)
    assert (tmp_path / "t.json").stat().st_size > 0 and "aten::" in (tmp_path / "ops.txt").read_text()
    assert torch.is_grad_enabled()
