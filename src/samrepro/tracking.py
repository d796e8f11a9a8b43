"""MLflow tracking behind a small interface: the StepResult JSONs stay the source of truth, MLflow is the index.

Layout: one experiment per (model, device) named "samrepro/<model>/<device>", one parent run per ablation, one
nested child run per step; a sweep (`samrepro sweep`) adds one run in "samrepro/sweeps" linked to its ablations'.
Idempotence: the parent carries `samrepro.folder_key` (hash of the absolute results folder) from the start and
`samrepro.results_key` (hash of that folder plus every StepResult and the plan info) only once everything is
logged. Logging a folder again whose key matches a complete run is skipped (its id is returned); a folder whose
contents changed (a resumed plan) or whose earlier logging broke off replaces its old runs, which are soft-deleted
together with their children. mlflow is imported inside functions only.

What the MLflow UI shows: runs carry the steps' own start and end times (they are logged after the fact), the data
set as their input, and the metrics users compare (TABLE_METRICS). Each experiment is tagged as model training and
holds a saved view of the runs table (steps in plan order, those metrics as columns); `experiment_url` opens it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from samrepro import results
from samrepro.results import StepResult, baseline, env_fields, flatten, plan_name, read_plan

LAYOUT = 2  # in the results key: runs logged by an older layout of this module are replaced when logged again
ARTIFACTS_DIR = "mlartifacts"  # beside a sqlite store's database file
FOLDER_TAG = "samrepro.folder_key"
SWEEP_EXPERIMENT = "samrepro/sweeps"  # one run per sweep; its ablations' parent runs stay in their own experiments
SWEEP_TAG = "samrepro.sweep_run"  # on an ablation's parent run: the sweep run it belongs to
KEY_TAG = "samrepro.results_key"  # set last: a parent run carrying it is complete
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
LOG_ENV = {  # the caller prints the parent run's address, not MLflow one line per run
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
METRICS = (
    "img_s",
    "latency_ms_p50",
    "latency_ms_p90",
    "click_ms_p50",  # the interactive workload's (absent from the others)
    "click_ms_p90",
    "encoder_ms",
    "encoder_tflop_s",
    "peak_mem_mib",
    "peak_mem_reserved_mib",
    "compile_s",
    "miou_gt",
    "miou_agreement",
    "embedding_sqnr_db",
    "amg_masks_per_image",  # the AMG workload's (absent from point-prompt runs)
    "amg_matched_miou",
    "amg_match_share",
    "amg_mask_count_diff",
    "amg_fp32_masks",
)
# What the runs table shows as columns; speedup is img_s over the fp32 step's, gate_pass 1/0 (none when skipped).
TABLE_METRICS = (
    "img_s", "speedup", "peak_mem_mib", "miou_agreement", "amg_matched_miou", "miou_gt", "gate_pass", "compile_s"
)  # fmt: skip
# MLflow 3 tags an experiment's kind; a UI that reads it opens a model-training experiment on its runs. The 3.17 UI
# follows its sidebar's GenAI / model-training switch instead, which `workflowType` in the address sets.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
WORKFLOW = "machine_learning"
# A view of the runs table kept in an experiment tag, as the UI's "share" button keeps one; `viewStateShareKey` in
# the address loads it. Sorting by run name lists every run flat, in plan order ("00 fp32", "01 bf16", ...):
# the UI nests children under their (collapsed) parent only when runs are sorted by start time. The columns come
# in this order, TABLE_METRICS first (the UI's default columns are source, models and dataset, no metrics).
VIEW_KEY = "samrepro"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_COLUMNS = [*(f"metrics.`{m}`" for m in TABLE_METRICS), "tags.`gate`", "params.`plan`", "attributes.`Dataset`"]
RUNS_VIEW = {
    "orderByKey": "tags.`mlflow.runName`",
    "orderByAsc": True,
    "selectedColumns": VIEW_COLUMNS,
    "columnOrder": VIEW_COLUMNS,
}
DATA_CONTEXT = "eval"  # the input tag mlflow.data.context: the images are measured on, not trained on
MAX_PARAM, MAX_TAG = 6000, 8000  # MLflow's value length limits


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; nothing was logged and the result JSONs are untouched."""


@dataclass(frozen=True)
class DatasetSpec:
    """The data a run measured on, logged as the run's input."""

    name: str  # the StepResult env's data label, e.g. "synthetic-val(seed=0, n=16)"
    source: str  # the data spec the runner was given ("synthetic", "noise:8", "coco:/abs/folder"), else the label
    digest: str  # of name and source only: the same on every re-logging


@dataclass
class RunSpec:
    """What one MLflow run records, built from StepResults without touching MLflow."""

    name: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: list[tuple[str, float, int]]  # (key, value, step)
    status: str = "FINISHED"
    files: dict[str, str] = field(default_factory=dict)  # artifact file name -> text
    start_ms: int | None = None
    end_ms: int | None = None
    dataset: DatasetSpec | None = None


class Tracker(Protocol):
    """Where an ablation's results are logged; `log_ablation` returns the parent run id."""

    def log_ablation(
        self, results_dir: Path, step_results: list[StepResult], plan_info: dict, report_dir: Path | None
    ) -> str: ...


def default_tracking_uri(cwd: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite file in `cwd` (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cwd).resolve() / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> Path | None:
    """`mlartifacts` beside a sqlite store's database file; None for a server, which picks its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]).resolve().parent / ARTIFACTS_DIR


def experiment_name(plan_info: dict) -> str:
    return f"samrepro/{plan_info['model']}/{plan_info['device']}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in the saved view, from the UI's base address."""
    query = urllib.parse.urlencode({"workflowType": WORKFLOW, "viewStateShareKey": VIEW_KEY})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def ui_address(tracking_uri: str, port: int, host: str = "127.0.0.1") -> str:
    """What `samrepro ui` prints: the runs of the store's one samrepro experiment, else the UI's start page.

    A sqlite store that does not exist yet is not created; a store that cannot be read gives the start page.
    """
    base = f"http://{host}:{port}/"
    db = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    if tracking_uri.startswith("sqlite:///") and not Path(db).exists():
        return base
    try:
        from mlflow import MlflowClient

        with _env(PROBE_HTTP):
            found = MlflowClient(tracking_uri).search_experiments(filter_string="name LIKE 'samrepro/%'")
    except Exception:
        return base
    return experiment_url(base, found[0].experiment_id) if len(found) == 1 else base


def dataset_spec(r: StepResult, plan_info: dict | None = None) -> DatasetSpec | None:
    """The step's data set, named by its env's data label; None for results that do not record one."""
    name = str(r.env.get("data") or "")[:500]  # MLflow's limit on a dataset name
    if not name:
        return None
    source = str((plan_info or {}).get("data") or name)
    return DatasetSpec(name, source, _sha(json.dumps([name, source]))[:16])


def results_key(results_dir: Path, step_results: list[StepResult], plan_info: dict) -> str:
    data = [LAYOUT, str(Path(results_dir).resolve()), plan_info, [r.to_dict() for r in step_results]]
    return _sha(json.dumps(data, sort_keys=True, default=str))


def step_metrics(r: StepResult, base_img_s: float | None = None) -> dict[str, float | None]:
    """A step's metrics (None where not measured): METRICS, speedup over `base_img_s` (the fp32 step's), gate_pass.

    Peak memory is what the step measured itself (CUDA max allocated, or peak RSS). MLflow's system metrics are not
    logged, even where psutil/pynvml are installed: MLflow samples them live while a run is open, and these runs are
    logged after the steps have finished, so there is nothing true to sample.
    """
    speedup = r.img_s / base_img_s if base_img_s and r.img_s is not None else None
    gate_pass = {"pass": 1.0, "fail": 0.0}.get(r.gate)
    return {m: getattr(r, m) for m in METRICS} | {"speedup": speedup, "gate_pass": gate_pass}


def step_run(r: StepResult, base_img_s: float | None = None, dataset: DatasetSpec | None = None) -> RunSpec:
    """The child run of one step; `base_img_s` is the fp32 step's throughput, `dataset` defaults to the label's."""
    params = {
        "step": r.step,
        "index": r.index,
        "patches": ",".join(r.patches) or "none",
        "batch_size": r.batch_size,
        "prompts_per_image": r.prompts_per_image,
        "images": r.images,
        "mode": r.mode,
        "plan": r.plan,
        "plan_hash": r.plan_hash,
        **flatten(r.workload, "workload"),
        **flatten(r.configs, "config"),
    }
    tags = {
        "status": r.status,
        "gate": r.gate,
        "reason": r.reason,
        "tolerance": json.dumps(r.tolerance, sort_keys=True),
        "gate_violations": "; ".join(r.gate_violations),
        "weights": r.weights,
        "changes_weights": r.changes_weights,
        **env_fields(r.env, "env"),
    }
    values = step_metrics(r, base_img_s) | {f"kernel_path.{k}": v for k, v in r.kernel_paths.items()}
    metrics, nonfinite = _finite(values, 0)
    tags |= {f"nonfinite.{k}": v for k, v in nonfinite.items()}  # e.g. SQNR of identical outputs is inf
    return RunSpec(
        name=f"{r.index:02d} {r.step}",
        params=_strings(params, MAX_PARAM),
        tags=_strings(tags, MAX_TAG),
        metrics=metrics,
        status="FAILED" if r.status == "failed" else "FINISHED",
        files={r.filename(): json.dumps(r.to_dict(), indent=2, sort_keys=True)},
        start_ms=_ms(r.started_at),
        end_ms=_ms(r.finished_at),
        dataset=dataset or dataset_spec(r),
    )


def ablation_run(results_dir: Path, step_results: list[StepResult], plan_info: dict) -> RunSpec:
    """The parent run: plan params, environment tags, and each step's metrics as a series over the plan index.

    It spans plan.json's `started_at`..`finished_at` where given, else the earliest step start to the latest step end.
    """
    gates = Counter(r.gate for r in step_results)
    folder = str(Path(results_dir).resolve())
    tags = {
        FOLDER_TAG: _sha(folder),
        "samrepro.results_dir": folder,
        "gate": "fail" if gates["fail"] else "pass" if gates["pass"] else "skipped",
        "gates": " ".join(f"{g}={gates[g]}" for g in results.GATES),
        **env_fields(step_results[0].env, "env"),
    }
    base = baseline(step_results)
    base_img_s = base.img_s if base else None
    metrics = [m for r in step_results for m in _finite(step_metrics(r, base_img_s), r.index)[0]]
    starts = [t for t in (_ms(r.started_at) for r in step_results) if t is not None]
    ends = [t for t in (_ms(r.finished_at) for r in step_results) if t is not None]
    return RunSpec(
        name=f"{plan_name(plan_info)} {plan_info.get('mode', '')}".strip() or "ablation",
        params=_strings(flatten(plan_info | {"plan": plan_name(plan_info)}), MAX_PARAM),
        tags=_strings(tags, MAX_TAG),
        metrics=metrics,
        files={"plan.json": json.dumps(plan_info, indent=2, sort_keys=True, default=str)},
        start_ms=_ms(str(plan_info.get("started_at") or "")) or min(starts, default=None),
        end_ms=_ms(str(plan_info.get("finished_at") or "")) or max(ends, default=None),
        dataset=dataset_spec(step_results[0], plan_info),
    )


def step_runs(step_results: list[StepResult], plan_info: dict) -> list[RunSpec]:
    """The child runs of an ablation, with speed-ups over its fp32 step."""
    base = baseline(step_results)
    base_img_s = base.img_s if base else None
    return [step_run(r, base_img_s, dataset_spec(r, plan_info)) for r in step_results]


class MlflowTracker:
    """Logs ablations to the MLflow store at `tracking_uri` (default: `default_tracking_uri(Path.cwd())`)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri(Path.cwd())

    def log_ablation(
        self, results_dir: Path, step_results: list[StepResult], plan_info: dict, report_dir: Path | None = None
    ) -> str:
        parent = ablation_run(results_dir, step_results, plan_info)
        key = results_key(results_dir, step_results, plan_info)
        import mlflow  # noqa: F401  (importing configures its loggers, so quiet them after)

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # e.g. "Updating database tables": not the user's news
        client = self._probe()
        with _env(LOG_ENV):
            exp_id = self._experiment(client, experiment_name(plan_info))
            previous = client.search_runs([exp_id], f"tags.`{FOLDER_TAG}` = '{parent.tags[FOLDER_TAG]}'")
            done = [run.info.run_id for run in previous if run.data.tags.get(KEY_TAG) == key]
            if done:
                return done[0]
            for run in previous:
                for child in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"):
                    client.delete_run(child.info.run_id)
                client.delete_run(run.info.run_id)
            parent_id = _log_run(client, exp_id, parent)
            for spec in step_runs(step_results, plan_info):
                _log_run(client, exp_id, spec, parent_id)
            if report_dir is not None:
                client.log_artifacts(parent_id, str(report_dir), "report")
            client.set_tag(parent_id, KEY_TAG, key)
            client.set_terminated(parent_id, "FINISHED", end_time=parent.end_ms)
        return parent_id

    def _probe(self) -> Any:
        """A client whose store answered one cheap request under a short timeout and no retries."""
        from mlflow import MlflowClient

        try:
            with _env(PROBE_HTTP):
                client = MlflowClient(self.tracking_uri)
                client.search_experiments(max_results=1)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise TrackingUnavailable(f"MLflow tracking store {self.tracking_uri} is unavailable: {first}") from e
        return client

    def _experiment(self, client: Any, name: str) -> str:
        """The experiment's id, created if new; its kind and runs view are (re)set, so older experiments get them."""
        found = client.get_experiment_by_name(name)
        if found is not None:
            exp_id = found.experiment_id
        else:
            root = artifact_root(self.tracking_uri)
            location = root.joinpath(*name.split("/")).as_uri() if root else None
            exp_id = client.create_experiment(name, artifact_location=location)
        client.set_experiment_tag(exp_id, KIND_TAG, KIND)
        client.set_experiment_tag(exp_id, VIEW_TAG, json.dumps(RUNS_VIEW))
        return exp_id


@dataclass
class LoggedRun:
    """A run as MemoryTracker keeps it."""

    run_id: str
    parent_id: str | None
    spec: RunSpec
    report_dir: Path | None = None


class MemoryTracker:
    """Keeps the runs it would log to MLflow, with the same idempotence; for tests of callers."""

    def __init__(self) -> None:
        self.runs: list[LoggedRun] = []

    def log_ablation(
        self, results_dir: Path, step_results: list[StepResult], plan_info: dict, report_dir: Path | None = None
    ) -> str:
        parent = ablation_run(results_dir, step_results, plan_info)
        key = results_key(results_dir, step_results, plan_info)
        for run in self.runs:
            if run.spec.tags.get(KEY_TAG) == key:
                return run.run_id
        stale = {run.run_id for run in self.runs if run.spec.tags.get(FOLDER_TAG) == parent.tags[FOLDER_TAG]}
        self.runs = [run for run in self.runs if run.run_id not in stale and run.parent_id not in stale]
        parent.tags[KEY_TAG] = key
        parent_id = uuid.uuid4().hex
        self.runs.append(LoggedRun(parent_id, None, parent, report_dir))
        self.runs += [LoggedRun(uuid.uuid4().hex, parent_id, spec) for spec in step_runs(step_results, plan_info)]
        return parent_id


def log_results_dir(results_dir: Path, tracking_uri: str | None = None) -> str:
    """Log a results folder (step_*.json, plan.json, and `report/` if written) into MLflow; returns the parent run id.

    plan.json, written by the runner, holds {plan, plan_hash, mode, model, device, batch_size, images, weights} and
    optionally `command`; keys it lacks are taken from the first StepResult.
    """
    results_dir = Path(results_dir)
    step_results = results.read_all(results_dir)
    if not step_results:
        raise ValueError(f"no step_*.json in {results_dir}")
    report_dir = results_dir / "report"
    return MlflowTracker(tracking_uri).log_ablation(
        results_dir, step_results, read_plan(results_dir, step_results), report_dir if report_dir.is_dir() else None
    )


def log_sweep(sweep_dir: Path, info: dict, ablation_runs: dict[str, str], tracking_uri: str | None = None) -> str:
    """The sweep's run in SWEEP_EXPERIMENT: its settings as params, its totals as metrics, sweep.json, summary.md and
    the chart as artifacts, and the ablations' parent runs (folder name -> run id) in a tag; each of those gets
    SWEEP_TAG pointing back. A sweep logged again replaces its run. Returns the sweep run's id."""
    sweep_dir = Path(sweep_dir)
    folder = str(sweep_dir.resolve())
    rows = json.loads((sweep_dir / "sweep.json").read_text()).get("ablations", [])
    totals = {
        "ablations": len(rows),
        **{f"steps_{s}": sum(r["steps"][s] for r in rows) for s in results.STATUSES},
        "gate_fails": sum(len(r["gate_fails"]) for r in rows),
    }
    tags = {
        FOLDER_TAG: _sha(folder),
        "samrepro.results_dir": folder,
        "command": info.get("command"),
        "samrepro.ablation_runs": json.dumps(ablation_runs, sort_keys=True),
    }
    spec = RunSpec(
        name=str(info["sweep"]["name"]),
        params=_strings(flatten(info["sweep"]), MAX_PARAM),
        tags=_strings(tags, MAX_TAG),
        metrics=_finite(totals, 0)[0],
        status="FAILED" if totals["steps_failed"] or totals["gate_fails"] else "FINISHED",
        start_ms=_ms(str(info.get("started_at") or "")),
        end_ms=_ms(str(info.get("finished_at") or "")),
    )
    import mlflow  # noqa: F401  (importing configures its loggers, so quiet them after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    tracker = MlflowTracker(tracking_uri)
    client = tracker._probe()
    with _env(LOG_ENV):
        exp_id = tracker._experiment(client, SWEEP_EXPERIMENT)
        for run in client.search_runs([exp_id], f"tags.`{FOLDER_TAG}` = '{spec.tags[FOLDER_TAG]}'"):
            client.delete_run(run.info.run_id)
        run_id = _log_run(client, exp_id, spec)
        for name in ("sweep.json", "summary.md", "throughput.png", "throughput.svg"):
            if (sweep_dir / name).is_file():
                client.log_artifact(run_id, str(sweep_dir / name))
        for child in ablation_runs.values():
            client.set_tag(child, SWEEP_TAG, run_id)
        client.set_terminated(run_id, spec.status, end_time=spec.end_ms)
    return run_id


def _log_run(client: Any, exp_id: str, spec: RunSpec, parent_id: str | None = None) -> str:
    from mlflow.entities import Metric, Param

    tags = spec.tags | ({"mlflow.parentRunId": parent_id} if parent_id else {})
    run_id = client.create_run(exp_id, start_time=spec.start_ms, tags=tags, run_name=spec.name).info.run_id
    stamp = spec.end_ms or int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, stamp, step) for k, v, step in spec.metrics],
        params=[Param(k, v) for k, v in spec.params.items()],
    )
    if spec.dataset is not None:
        client.log_inputs(run_id, [_dataset_input(spec.dataset)])
    for name, text in spec.files.items():
        client.log_text(run_id, text, name)
    if parent_id:
        client.set_terminated(run_id, spec.status, end_time=spec.end_ms)
    return run_id


def _dataset_input(d: DatasetSpec) -> Any:
    """A run input naming the data set; only its description is stored, no data is uploaded."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if d.source.startswith("coco:"):  # a folder on this machine: MLflow's "local" source type, by its path
        kind, source = "local", {"uri": d.source.removeprefix("coco:")}
    else:  # generated by samrepro.data: a "code" source holding the spec
        kind, source = "code", {"tags": {"samrepro.data": d.source}}
    dataset = Dataset(d.name, d.digest, kind, json.dumps(source))
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, DATA_CONTEXT)])


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (MLflow reads its HTTP limits per request) and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _finite(values: dict[str, Any], step: int) -> tuple[list[tuple[str, float, int]], dict[str, str]]:
    """Metrics MLflow can store (None dropped), and the non-finite ones as text for tags."""
    present = {k: float(v) for k, v in values.items() if v is not None}
    return [(k, v, step) for k, v in present.items() if math.isfinite(v)], {
        k: str(v) for k, v in present.items() if not math.isfinite(v)
    }


def _strings(d: dict[str, Any], limit: int) -> dict[str, str]:
    return {k: str(v)[:limit] for k, v in d.items() if v is not None}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ms(iso: str) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None
