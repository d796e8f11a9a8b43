"""The bench protocol, the per-step subprocess and the runner: results, resume, force, failures, exit codes."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import samrepro
from samrepro import bench, flops, registry, results, runner, step
from samrepro.models import load_model
from samrepro.registry import apply_patches
from samrepro.results import StepResult
from samrepro.spec import StepSpec
from samrepro.workload import Sample

E2E_PLAN = """
name = "e2e"
[[steps]]
name = "fp32"
[[steps]]
name = "sync_free"
add = ["sync_free"]
[[steps]]
name = "ghost"
add = ["no_such_patch"]
"""
STRICT_STEP = """
[[steps]]
name = "strict"
add = ["bf16"]
[steps.tolerance]
embedding_sqnr_min_db = 200.0  # bf16 cannot reach this: the gate must fail
"""


def sample(rng: np.random.Generator, h: int, w: int, prompts: int) -> Sample:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = np.zeros((prompts, h, w), dtype=bool)
    points = np.zeros((prompts, 1, 2), dtype=np.float32)
    for i in range(prompts):
        gt[i, 10 * i : 10 * i + 40, 20:80] = True
        points[i, 0] = (50, 10 * i + 20)  # x, y inside its mask
    return Sample(image=image, points=points, labels=np.ones((prompts, 1), dtype=np.int64), gt_masks=gt)


def step_spec(**fields) -> StepSpec:
    """A spec of step 1 of a tiny CPU run on random weights."""
    setup = dict(model="tiny", device="cpu", batch_size=2, images=3, prompts=None, weights="random")
    return StepSpec(**setup | dict(weights_sha256=None, data="synthetic", plan="p", plan_hash="h", mode="cumulative",
                    index=1, step="s", patches=[]) | fields)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine's 2 cores are shared; more threads only spin
    sam = load_model("tiny", "cpu", "random")
    yield sam
    torch.set_num_threads(threads)


def test_bench_pads_the_last_batch_but_counts_real_images(tiny):
    rng = np.random.default_rng(0)
    samples = [sample(rng, 120, 160, 2), sample(rng, 100, 90, 1), sample(rng, 140, 120, 3)]
    encoder_batches, decoder_calls = [], []
    hooks = [
        tiny.image_encoder.register_forward_pre_hook(lambda m, args: encoder_batches.append(args[0].shape[0])),
        tiny.mask_decoder.register_forward_pre_hook(lambda m, args: decoder_calls.append(1)),
    ]
    try:
        out = bench.run(tiny, samples, batch_size=2, clock=itertools.count().__next__)  # each clock() is 1 "s" on
    finally:
        for h in hooks:
            h.remove()
    assert encoder_batches == [2] * (bench.WARMUP_RUNS + 2)  # the last batch (1 image) is padded to 2
    assert len(decoder_calls) == bench.WARMUP_RUNS * 2 + 3  # padding is encoded, never decoded
    # per batch: clock at start, before and after the encoder, at the end: 3 "s" timed, of which 1 is the encoder
    assert out.images == 3 and out.prompts == 6 and out.timed_s == 6 and out.encoder_s == 2
    assert out.img_s == 0.5  # 3 real images over 2 timed batches, not 4
    assert out.latency_ms == [1500.0, 1500.0, 3000.0]  # batch time / real images in it
    assert out.encoder_ms == 2e3 / 3
    assert [m.shape for m in out.best_masks] == [(2, 120, 160), (1, 100, 90), (3, 140, 120)]
    assert out.embeddings.shape[0] == 2 and out.embeddings.dtype == torch.float32
    assert 0.0 <= out.miou_gt <= 1.0 and out.peak_mem_mib > 0


def test_warm_up_runs_each_batch_with_new_decoder_shapes_once(tiny):
    rng = np.random.default_rng(0)
    counts = [2, 1, 1, 2, 3, 1, 2, 1]  # batches of 2: {2, 1, 3}, {1, 2, 3} seen, {3, 1, 4} new, {2, 1, 3} seen
    samples = [sample(rng, 64, 64, n) for n in counts]
    encoder_batches = []
    hook = tiny.image_encoder.register_forward_pre_hook(lambda m, args: encoder_batches.append(args[0].shape[0]))
    try:
        out = bench.run(tiny, samples, batch_size=2, clock=itertools.count().__next__)
    finally:
        hook.remove()
    assert len(encoder_batches) == bench.WARMUP_RUNS + 1 + 4  # the third batch once untimed, then 4 timed
    assert out.images == 8 and out.timed_s == 4 * 3  # warm-up runs stay out of the timed seconds
    assert out.compile_s == 1  # one clock tick brackets the whole warm-up
    assert bench.decoder_shapes([samples[4], samples[5]]) == {3, 1, 4}


def test_masks_pack_roundtrip():
    masks = torch.rand(3, 7, 5) > 0.5
    assert torch.equal(bench.Masks.pack(masks).unpack(), masks)


def test_profile_writes_a_chrome_trace_and_an_ops_table(tiny, tmp_path):
    samples = [sample(np.random.default_rng(1), 64, 64, 1)]
    bench.profile(tiny, samples, 1, tmp_path / "t.trace.json.gz", tmp_path / "t.ops.txt", None)
    assert "traceEvents" in json.loads(gzip.decompress((tmp_path / "t.trace.json.gz").read_bytes()))
    assert "aten::linear" in (tmp_path / "t.ops.txt").read_text()


def test_gate_against_the_stored_baseline_can_fail(tiny, tmp_path):
    """The step's gate: the same model passes bit-exactly, a model with other weights fails it."""
    samples = [sample(np.random.default_rng(2), 96, 128, 2), sample(np.random.default_rng(3), 80, 80, 1)]
    spec = step_spec()
    step.save_baseline(tmp_path / step.BASELINE, bench.run(tiny, samples, 2), spec.inputs())
    other = load_model("tiny", "cpu", "random", seed=1)
    for model, verdict in ((tiny, "pass"), (other, "fail")):
        result = StepResult("tiny", "cpu", 2, "s", 1, [], "ok", "skipped", "random(seed=0)")
        step.gate(result, bench.run(model, samples, 2), tmp_path / step.BASELINE, spec)
        assert result.gate == verdict and bool(result.gate_violations) == (verdict == "fail")
    assert result.miou_agreement < 1.0 and result.embedding_sqnr_db < 10


def test_random_weight_pruning_is_gated_against_fp32_with_the_same_pruning(tiny, tmp_path):
    """sparse24 on random weights fails against unpruned fp32 (pruning noise costs more than the tolerance declared
    for trained weights), passes against fp32 with the same pruning, and a different weight change still fails."""
    samples = [sample(np.random.default_rng(4), 96, 128, 2), sample(np.random.default_rng(5), 80, 80, 1)]
    spec = step_spec(patches=["sparse24"])
    step.save_baseline(tmp_path / step.BASELINE, bench.run(tiny, samples, 2), spec.inputs())
    same = step.same_change_reference(spec, ["sparse24"], samples)
    assert same is not None and same.config == {"kernel": "masked"}
    assert step.same_change_reference(dataclasses.replace(spec, weights="official"), ["sparse24"], samples) is None
    assert step.same_change_reference(spec, ["bf16"], samples) is None  # bf16 keeps the weights
    verdicts = {}
    for label, seed, against in (("as is", 0, None), ("same", 0, same), ("other", 1, same)):
        model = load_model("tiny", "cpu", "random", seed=seed)
        apply_patches(model, ["sparse24"])  # on the CPU every layer takes the masked path
        result = StepResult("tiny", "cpu", 2, "s", 1, ["sparse24"], "ok", "skipped", "random(seed=0)")
        step.gate(result, bench.run(model, samples, 2), tmp_path / step.BASELINE, spec, against)
        verdicts[label] = result.gate
        if against is not None:
            assert "against fp32 with sparse24's weight change" in result.tolerance_source
    assert verdicts == {"as is": "fail", "same": "pass", "other": "fail"}


def test_outcome_exit_code():
    def r(status: str, gate: str) -> StepResult:
        return StepResult("tiny", "cpu", 2, "s", 0, [], status, gate, "random(seed=0)")

    assert runner.Outcome(Path("."), [r("ok", "skipped"), r("ok", "pass"), r("skipped", "skipped")]).exit_code == 0
    assert runner.Outcome(Path("."), [r("ok", "pass"), r("ok", "fail")]).exit_code == 1
    assert runner.Outcome(Path("."), [r("ok", "pass"), r("failed", "skipped")]).exit_code == 1


def ablate(plan: Path, folder: Path, **kw) -> runner.Outcome:
    return runner.run_ablation(
        "tiny", "cpu", plan=plan, batch_size=2, images=2, weights="random", results_dir=folder, track=False, **kw
    )


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, step_env):
    """One real run: fp32, sync_free, a patch that is not registered, bf16 held to an impossible gate."""
    folder = tmp_path_factory.mktemp("e2e")
    plan = folder / "e2e.toml"
    plan.write_text(E2E_PLAN + STRICT_STEP)
    outcome = ablate(plan, folder / "results", profile=True)
    return plan, outcome


def fake_step(monkeypatch, tmp_path: Path, code: int = 3) -> Path:
    """Replace the step process with one that logs its call and dies without writing a result."""
    calls = tmp_path / "calls.txt"
    script = f"import sys; open({str(calls)!r}, 'a').write(sys.argv[1] + '\\n'); print('boom'); sys.exit({code})"
    monkeypatch.setattr(runner, "STEP_COMMAND", [sys.executable, "-c", script])
    return calls


def test_e2e_results(e2e):
    _, outcome = e2e
    by_name = {r.step: r for r in outcome.results}
    assert [r.status for r in outcome.results][:3] == ["ok", "ok", "skipped"]
    folder = outcome.results_dir
    assert {r.step for r in results.read_all(folder)} == set(by_name)  # the JSONs on disk are the results
    base, sync, ghost = by_name["fp32"], by_name["sync_free"], by_name["ghost"]
    assert base.gate == "skipped" and base.reason == "reference step" and (folder / step.BASELINE).is_file()
    assert sync.miou_agreement == 1.0 and sync.embedding_sqnr_db == math.inf and sync.gate == "pass"
    assert sync.tolerance["agreement_miou_min"] == 1.0 and sync.patches == ["sync_free"]
    assert "no_such_patch not registered" in ghost.reason and ghost.gate == "skipped"
    for r in (base, sync):
        assert r.images == 2 and r.img_s > 0 and r.latency_ms_p90 >= r.latency_ms_p50 > 0
        assert 0 < r.encoder_ms < r.latency_ms_p90
        assert r.encoder_tflop_s == pytest.approx(flops.encoder_flops("tiny") / r.encoder_ms / 1e9)  # no padded images
        assert r.peak_mem_mib > 0 and r.compile_s >= 0 and r.weights == "random(seed=0)"
        assert r.env["versions"]["torch"] == torch.__version__ and "plan" not in r.env  # plan.json holds it
        if samrepro.USER_INDUCTOR_CACHE is None:  # samrepro's shared cache, not the default torchao's import set
            assert Path(r.env["inductor_cache"]).parent == Path(os.environ["SAMREPRO_CACHE"]) / "inductor"
        stem = folder / "traces" / f"step_{r.index:02d}_{r.step}"
        assert Path(f"{stem}.trace.json.gz").is_file() and Path(f"{stem}.ops.txt").is_file()
    setup = json.loads((folder / "plan.json").read_text())
    assert {
        "plan",
        "plan_hash",
        "mode",
        "model",
        "device",
        "batch_size",
        "images",
        "weights",
        "data",
        "command",
    } <= set(setup)
    assert setup["plan_hash"] == sync.plan_hash and setup["weights"] == "random"
    spec = StepSpec.read(folder / "specs" / sync.filename())  # names the plan by name and hash, nothing more
    assert (spec.plan, spec.plan_hash, spec.patches) == ("e2e", sync.plan_hash, ["sync_free"])


def test_failed_gate_gives_exit_code_1(e2e):
    _, outcome = e2e
    strict = outcome.results[-1]
    assert strict.status == "ok" and strict.gate == "fail"
    assert any(v.startswith("embedding_sqnr_db") for v in strict.gate_violations)
    assert strict.reason == "runs without no_such_patch (skipped earlier)"
    assert outcome.exit_code == 1


def test_rerun_resumes_without_running_a_step(e2e, monkeypatch, tmp_path):
    plan, outcome = e2e
    before = {p.name: p.stat().st_mtime_ns for p in outcome.results_dir.glob("step_*.json")}
    calls = fake_step(monkeypatch, tmp_path)
    again = ablate(plan, outcome.results_dir)
    assert not calls.exists()
    assert {p.name: p.stat().st_mtime_ns for p in outcome.results_dir.glob("step_*.json")} == before
    assert [r.to_dict() for r in again.results] == [r.to_dict() for r in outcome.results]


def test_a_result_of_another_patch_revision_is_not_kept(e2e, monkeypatch, tmp_path):
    plan, outcome = e2e
    folder = tmp_path / "copy"
    shutil.copytree(outcome.results_dir, folder)
    assert next(r for r in outcome.results if r.step == "sync_free").revisions == {"sync_free": 1}
    revised = dataclasses.replace(registry.get_patch("sync_free"), revision=2)
    monkeypatch.setitem(registry._PATCHES, "sync_free", revised)
    calls = fake_step(monkeypatch, tmp_path)
    ablate(plan, folder)
    rerun = [Path(line).name for line in calls.read_text().split()]
    assert rerun == ["step_01_sync_free.json", "step_03_strict.json"]  # the steps that apply sync_free


def test_changed_weights_file_is_not_resumed(step_env, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    plan, path = tmp_path / "p.toml", tmp_path / "w.safetensors"
    plan.write_text(E2E_PLAN)
    for seed in (0, 1):  # same path, new contents: the second run must not keep the first run's steps
        save_file(
            {k: v.contiguous() for k, v in load_model("tiny", weights="random", seed=seed).state_dict().items()},
            path,
        )
        calls = fake_step(monkeypatch, tmp_path) if seed else None
        outcome = runner.run_ablation(
            "tiny", "cpu", plan=plan, batch_size=2, images=2, weights=str(path), results_dir=tmp_path / "r", track=False
        )
    assert calls.exists() and outcome.exit_code == 1  # the fake step ran (and crashed) instead of a resume


def test_force_reruns_and_a_crash_is_recorded(e2e, monkeypatch, tmp_path):
    plan, outcome = e2e
    folder = shutil.copytree(outcome.results_dir, tmp_path / "copy")
    calls = fake_step(monkeypatch, tmp_path)
    forced = ablate(plan, folder, force=True)
    ran = calls.read_text().split()
    failed = [r for r in forced.results if r.status == "failed"]
    assert [Path(p).name for p in ran] == [r.filename() for r in failed]
    assert len(failed) == len(ran) >= 2  # every step was tried: the sweep went on after the first crash
    assert all("exited with code 3" in r.reason and "boom" in r.error for r in failed)
    assert forced.exit_code == 1
    calls.unlink()
    again = ablate(plan, folder)  # failed steps run again without --force; the skipped one is kept
    assert len(calls.read_text().split()) == len(ran) and again.results[2].status == "skipped"


def test_bad_config_fails_fast_and_the_sweep_goes_on(step_env, monkeypatch, tmp_path):
    plan = tmp_path / "bad.toml"
    plan.write_text(E2E_PLAN.replace('add = ["sync_free"]', 'add = ["sync_free"]\nconfig.sync_free.bogus = 1'))
    calls = fake_step(monkeypatch, tmp_path)
    outcome = ablate(plan, tmp_path / "results")
    assert [r.status for r in outcome.results] == ["failed", "failed", "skipped"]
    assert "invalid config for sync_free" in outcome.results[1].reason and "bogus" in outcome.results[1].reason
    assert len(calls.read_text().split()) == 1  # only the fp32 step needed a process


def test_step_process_records_its_own_exception(e2e, tmp_path):
    """The entry point itself: a step that raises writes a failed result with the traceback."""
    _, outcome = e2e
    spec = json.loads((outcome.results_dir / "specs" / "step_01_sync_free.json").read_text())
    spec |= {"configs": {"sync_free": {"bogus": 1}}, "results_dir": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert step.main([str(tmp_path / "spec.json")]) == 1
    result = results.read(tmp_path / "step_01_sync_free.json")
    assert result.status == "failed" and "bogus" in result.reason and "Traceback" in result.error


def test_patches_by_name_make_an_adhoc_plan(step_env, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = fake_step(monkeypatch, tmp_path)
    outcome = runner.run_ablation(
        "tiny", "cpu", patches=["sync_free", "sdpa"], batch_size=2, images=2, weights="random", track=False
    )
    assert outcome.results_dir == Path("results/tiny-cpu-patches-sync_free+sdpa-cumulative-bs2")
    assert [(r.step, r.patches) for r in outcome.results] == [
        ("fp32", []), ("sync_free", ["sync_free"]), ("sdpa", ["sync_free", "sdpa"])
    ]  # fmt: skip
    assert len(calls.read_text().split()) == 3
