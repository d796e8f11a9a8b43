"""The AMG workload through the runner on the tiny model and a CPU: step processes, gates, baseline, report, tracking,
and resume keyed by the workload."""

from __future__ import annotations

import math

import pytest
import torch

from samrepro import report, results, runner, step, tracking
from samrepro.amg_compare import MIN_GATED_MASKS
from samrepro.plans import parse
from tests.test_runner import fake_step

PLAN = {
    "name": "amg-e2e",
    "steps": [
        {"name": "fp32"},
        {"name": "sync_free", "add": ["sync_free"]},
        {"name": "bf16", "add": ["bf16"]},
        {"name": "best_mask_only", "add": ["best_mask_only"]},  # cannot serve the generator: skipped
    ],
}
GRID = {"points_per_side": 4}  # 16 points per image: seconds per step on two cores


def ablate(folder, **kw) -> runner.Outcome:
    return runner.run_ablation(
        "tiny", "cpu", plan=parse(PLAN), images=2, results_dir=folder, track=False, **{"workload": "amg"} | kw
    )


@pytest.fixture(scope="module")
def amg_run(tmp_path_factory, step_env):
    return ablate(tmp_path_factory.mktemp("amg") / "results", workload_options=GRID)


@pytest.mark.slow
def test_amg_steps_are_measured_and_gated(amg_run):
    assert amg_run.exit_code == 0
    base, sync, bf16, skipped = amg_run.results
    assert [r.status for r in amg_run.results] == ["ok", "ok", "ok", "skipped"]
    assert "reads all 3 masks per point" in skipped.reason
    for r in (base, sync, bf16):
        assert r.workload["name"] == "amg" and r.workload["points_per_side"] == 4 and r.batch_size == 1
        assert r.images == 2 and r.prompts_per_image == 16 and r.img_s > 0
        assert r.latency_ms_p90 >= r.latency_ms_p50 > 0 and r.peak_mem_mib > 0
        assert r.amg_masks_per_image > 0 and r.miou_gt is None and r.miou_agreement is None  # no ground truth
    assert base.gate == "skipped" and base.amg_matched_miou is None
    assert sync.amg_matched_miou == sync.amg_match_share == 1.0 and sync.amg_mask_count_diff == 0.0
    assert sync.embedding_sqnr_db == math.inf and sync.gate == "pass"
    assert sync.amg_fp32_masks == base.amg_masks_per_image * base.images  # what the matched measures are over
    assert (sync.amg_fp32_masks < MIN_GATED_MASKS) == ("not gated" in (sync.reason or ""))
    assert set(bf16.tolerance) == {"amg_matched_miou_min", "amg_match_share_min", "embedding_sqnr_min_db"}
    assert bf16.gate == "pass" and bf16.amg_matched_miou >= bf16.tolerance["amg_matched_miou_min"]
    state = torch.load(amg_run.results_dir / step.BASELINE, weights_only=True)
    assert state["inputs"]["workload"] == base.workload and len(state["amg_masks"]) == 2


@pytest.mark.slow
def test_amg_report_and_tracking(amg_run):
    text = (amg_run.results_dir / "report" / "report.md").read_text()
    assert report.AMG_NOTE in text and "| matched mIoU |" in text and "mIoU GT" not in text
    assert "4² points per image" in text and "No published figure: the sources timed point prompts" in text
    runs = tracking.step_runs(results.read_all(amg_run.results_dir), {"data": "synthetic"})
    sync = runs[1]
    assert sync.params["workload.name"] == "amg" and sync.params["workload.points_per_side"] == "4"
    assert {"amg_matched_miou", "amg_match_share", "amg_mask_count_diff", "amg_masks_per_image", "amg_fp32_masks"} <= {
        k for k, _, _ in sync.metrics
    }


@pytest.mark.slow
def test_amg_results_resume_only_for_the_same_workload(amg_run, monkeypatch, tmp_path):
    calls = fake_step(monkeypatch, tmp_path)
    again = ablate(amg_run.results_dir, workload_options=GRID)
    assert not calls.exists() and [r.to_dict() for r in again.results] == [r.to_dict() for r in amg_run.results]
    ablate(amg_run.results_dir, workload_options={"points_per_side": 5})  # another grid: every step runs again
    assert len(calls.read_text().splitlines()) == 3  # fp32, sync_free, bf16 (best_mask_only stays skipped)
