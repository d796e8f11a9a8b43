"""Tracking: a real MLflow server on loopback, the sqlite default store, idempotence, and an unreachable store."""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime

import pytest

from samrepro import results
from samrepro.results import StepResult
from samrepro.tracking import (
    KEY_TAG,
    KIND,
    KIND_TAG,
    VIEW_TAG,
    MemoryTracker,
    TrackingUnavailable,
    _dataset_input,
    ablation_run,
    dataset_spec,
    default_tracking_uri,
    experiment_url,
    log_results_dir,
    step_metrics,
    ui_address,
)
from tests.conftest import PLAN_INFO
from tests.servers import free_port, mlflow_process

DATA = "synthetic-val(seed=0, n=4)"  # the env's data label
ENV = {"plan": {"name": "blog", "steps": []}, "torch": "2.11.0", "git": {"commit": "abc123", "dirty": False}}
ENV |= {"data": DATA}


def step(index, name, patches, **kw):
    base = dict(model="tiny", device="cpu", batch_size=2, step=name, index=index, patches=patches, status="ok")
    return StepResult(**(base | dict(gate="pass", weights="random(seed=0)", plan="blog", env=ENV) | kw))


def at(minute):
    return f"2026-01-05T10:{minute:02d}:00+00:00"


def ms(minute):
    return int(datetime.fromisoformat(at(minute)).timestamp() * 1000)


def write_results(folder):
    for r in [
        step(0, "fp32", [], gate="skipped", img_s=10.0, peak_mem_mib=500.0, started_at=at(0), finished_at=at(1)),
        step(
            1,
            "bf16",
            ["bf16"],
            started_at=at(1),
            finished_at=at(3),
            img_s=25.0,
            latency_ms_p90=45.5,
            embedding_sqnr_db=float("inf"),
            configs={"bf16": {"dtype": "bfloat16"}},
            tolerance={"agreement_miou_min": 0.9},
        ),
        step(2, "compile", ["bf16", "compile"], status="skipped", gate="skipped", reason="needs CUDA"),
        step(3, "sdpa", ["bf16", "sdpa"], status="failed", gate="skipped", reason="RuntimeError: boom"),
        step(4, "int8", ["bf16", "int8_dynamic"], gate="fail", img_s=30.0, changes_weights=True, finished_at=at(7)),
    ]:
        results.write(r, folder)
    (folder / "plan.json").write_text(json.dumps(PLAN_INFO | {"data": "synthetic"}))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    store = [
        "--backend-store-uri",
        f"sqlite:///{root / 'db.sqlite'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    with mlflow_process("server", store, root / "server.log", "/health") as url:
        yield url


def rest(url, endpoint, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def kv(items):
    return {i["key"]: i["value"] for i in items}


def test_server_parent_and_children(server, tmp_path):
    res = write_results(tmp_path / "res")
    (res / "report").mkdir()
    (res / "report" / "report.md").write_text("# report\n")
    parent_id = log_results_dir(res, server)
    name = urllib.parse.quote("samrepro/tiny/cpu", safe="")
    exp_id = rest(server, f"experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
    runs = rest(server, "runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
    assert len(runs) == 6
    by_name = {r["info"]["run_name"]: r for r in runs}
    parent = next(r for r in runs if r["info"]["run_id"] == parent_id)
    ptags, pparams = kv(parent["data"]["tags"]), kv(parent["data"]["params"])
    assert ptags["gate"] == "fail" and ptags["gates"] == "pass=1 fail=1 skipped=3" and KEY_TAG in ptags
    assert ptags["env.git.commit"] == "abc123" and ptags["env.torch"] == "2.11.0"
    assert not any(k.startswith("env.plan.") for k in ptags) and parent["info"]["run_name"] == "blog cumulative"
    assert pparams["plan"] == "blog" and pparams["plan_hash"] == "h1" and pparams["batch_size"] == "2"
    history = rest(server, f"metrics/get-history?run_id={parent_id}&metric_key=img_s")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(0, 10.0), (1, 25.0), (4, 30.0)]  # the waterfall
    history = rest(server, f"metrics/get-history?run_id={parent_id}&metric_key=speedup")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(0, 1.0), (1, 2.5), (4, 3.0)]  # over fp32's 10 img/s
    history = rest(server, f"metrics/get-history?run_id={parent_id}&metric_key=gate_pass")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(1, 1.0), (4, 0.0)]  # fp32's skipped gate: no value
    # the parent spans its steps' own times (fp32's start to int8's end), not the moment it was logged
    assert (int(parent["info"]["start_time"]), int(parent["info"]["end_time"])) == (ms(0), ms(7))
    experiment = rest(server, f"experiments/get?experiment_id={exp_id}")["experiment"]
    etags = kv(experiment["tags"])
    assert etags[KIND_TAG] == KIND == "custom_model_development"
    view = json.loads(etags[VIEW_TAG])
    assert view["orderByKey"] == "tags.`mlflow.runName`" and view["orderByAsc"] is True
    assert {"metrics.`img_s`", "metrics.`speedup`", "metrics.`gate_pass`", "metrics.`miou_gt`"} <= set(
        view["selectedColumns"]
    )
    children = [r for r in runs if kv(r["data"]["tags"]).get("mlflow.parentRunId") == parent_id]
    assert sorted(r["info"]["run_name"] for r in children) == ["00 fp32", "01 bf16", "02 compile", "03 sdpa", "04 int8"]
    bf16 = by_name["01 bf16"]
    tags, params, metrics = kv(bf16["data"]["tags"]), kv(bf16["data"]["params"]), kv(bf16["data"]["metrics"])
    assert metrics == {"img_s": 25.0, "latency_ms_p90": 45.5, "speedup": 2.5, "gate_pass": 1.0}
    assert (int(bf16["info"]["start_time"]), int(bf16["info"]["end_time"])) == (ms(1), ms(3))
    for run in runs:  # every run names the data set it measured on as its input
        (given,) = run["inputs"]["dataset_inputs"]
        assert kv(given["tags"]) == {"mlflow.data.context": "eval"}
        assert given["dataset"]["name"] == DATA and given["dataset"]["source_type"] == "code"
        assert json.loads(given["dataset"]["source"]) == {"tags": {"samrepro.data": "synthetic"}}
    assert tags["nonfinite.embedding_sqnr_db"] == "inf" and tags["gate"] == "pass" and tags["status"] == "ok"
    assert json.loads(tags["tolerance"]) == {"agreement_miou_min": 0.9} and tags["weights"] == "random(seed=0)"
    assert params["patches"] == "bf16" and params["config.bf16.dtype"] == "bfloat16" and params["batch_size"] == "2"
    compile_tags = kv(by_name["02 compile"]["data"]["tags"])
    assert compile_tags["status"] == "skipped" and compile_tags["reason"] == "needs CUDA"
    assert "metrics" not in by_name["02 compile"]["data"]
    assert by_name["03 sdpa"]["info"]["status"] == "FAILED" and kv(by_name["04 int8"]["data"]["tags"])["gate"] == "fail"
    files = rest(server, f"artifacts/list?run_id={bf16['info']['run_id']}")["files"]
    assert [f["path"] for f in files] == ["step_01_bf16.json"]
    report = rest(server, f"artifacts/list?run_id={parent_id}&path=report")["files"]
    assert [f["path"] for f in report] == ["report/report.md"]
    assert log_results_dir(res, server) == parent_id  # idempotent
    assert len(rest(server, "runs/search", {"experiment_ids": [exp_id]})["runs"]) == 6


def test_sqlite_store_idempotence_and_replace(tmp_path):
    from mlflow import MlflowClient

    res = write_results(tmp_path / "res")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    first = log_results_dir(res, uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("samrepro/tiny/cpu")
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts" / "samrepro" / "tiny" / "cpu").as_uri()
    assert (tmp_path / "store/mlartifacts/samrepro/tiny/cpu" / first / "artifacts/plan.json").exists()
    assert log_results_dir(res, uri) == first
    assert len(client.search_runs([exp.experiment_id])) == 6
    digest = client.get_run(first).inputs.dataset_inputs[0].dataset.digest
    results.write(step(5, "int8_more", ["bf16", "int8_dynamic"], img_s=31.0), res)  # a resumed plan adds a step
    second = log_results_dir(res, uri)
    assert second != first and client.get_run(first).info.lifecycle_stage == "deleted"
    assert len(client.search_runs([exp.experiment_id])) == 7
    assert client.get_run(second).inputs.dataset_inputs[0].dataset.digest == digest  # the same data, the same digest
    # the UI's address: the one samrepro experiment's runs, then its start page once there are two
    assert ui_address(uri, 5005) == experiment_url("http://127.0.0.1:5005/", exp.experiment_id)
    assert experiment_url("http://127.0.0.1:5005/", "7") == (
        "http://127.0.0.1:5005/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=samrepro"
    )
    other = write_results(tmp_path / "other")
    (other / "plan.json").write_text(json.dumps(PLAN_INFO | {"device": "cuda"}))
    log_results_dir(other, uri)
    assert ui_address(uri, 5005) == "http://127.0.0.1:5005/"


def test_ui_address_does_not_create_a_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ui_address(uri, 5000) == "http://127.0.0.1:5000/" and not (tmp_path / "mlflow.db").exists()


def test_metrics_times_and_dataset_without_mlflow(tmp_path):
    steps = results.read_all(write_results(tmp_path / "res"))
    _, bf16, compile_, _, int8 = steps
    assert step_metrics(bf16, 10.0)["speedup"] == 2.5 and step_metrics(bf16)["speedup"] is None  # no fp32 step
    assert [step_metrics(r)["gate_pass"] for r in steps] == [None, 1.0, None, None, 0.0]
    assert step_metrics(compile_, 10.0)["speedup"] is None  # skipped: nothing measured, nothing made up
    parent = ablation_run(tmp_path / "res", steps, PLAN_INFO)
    assert (parent.start_ms, parent.end_ms) == (ms(0), ms(7))
    timed = PLAN_INFO | {"started_at": "2026-01-05T09:59:00+00:00", "finished_at": at(8)}
    parent = ablation_run(tmp_path / "res", steps, timed)  # the runner's own times win where plan.json has them
    assert (parent.start_ms, parent.end_ms) == (ms(8) - 9 * 60_000, ms(8))
    untimed = [step(0, "fp32", [], img_s=1.0)]
    assert ablation_run(tmp_path / "res", untimed, PLAN_INFO).start_ms is None  # MLflow then stamps the log time
    coco = dataset_spec(int8, {"data": "coco:/data/coco"})
    assert coco.name == DATA and coco.source == "coco:/data/coco"
    assert dataset_spec(bf16, {"data": "coco:/data/coco"}).digest == coco.digest  # of the data, not of the step
    assert dataset_spec(int8, {"data": "synthetic"}).digest != coco.digest
    given = _dataset_input(coco)
    assert given.dataset.source_type == "local" and json.loads(given.dataset.source) == {"uri": "/data/coco"}
    assert dataset_spec(step(0, "fp32", [], env={})) is None  # results that predate the data label


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_unreachable_server_fails_fast(tmp_path):
    import mlflow  # noqa: F401  (import time is not the probe's)

    res = write_results(tmp_path / "res")
    before = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="unavailable"):
        log_results_dir(res, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert time.monotonic() - start < 5
    assert {k: os.environ.get(k) for k in before} == before
    assert len(list(res.glob("step_*.json"))) == 5


def test_memory_tracker_replaces_changed_folder(tmp_path):
    res = write_results(tmp_path / "res")
    tracker = MemoryTracker()
    steps = results.read_all(res)
    first = tracker.log_ablation(res, steps, PLAN_INFO, None)
    assert tracker.log_ablation(res, steps, PLAN_INFO, None) == first and len(tracker.runs) == 6
    second = tracker.log_ablation(res, steps[:3], PLAN_INFO, None)
    assert second != first and len(tracker.runs) == 4
    child = next(r for r in tracker.runs if r.spec.name == "01 bf16")
    assert child.parent_id == second and ("img_s", 25.0, 0) in child.spec.metrics
    assert ("speedup", 2.5, 0) in child.spec.metrics and ("gate_pass", 1.0, 0) in child.spec.metrics
    assert child.spec.dataset.name == DATA and child.spec.dataset.source == DATA  # PLAN_INFO has no data spec


def test_import_does_not_load_mlflow_or_matplotlib():
    code = "import sys, samrepro.tracking, samrepro.report; print('mlflow' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
