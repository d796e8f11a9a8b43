"""StepResult: the JSON each ablation step writes; the source of truth for tracking and reports."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = 1
PLAN_FILE = "plan.json"  # written by the runner: the plan and the run's settings, once per folder
PLAN_KEYS = ("plan", "plan_hash", "mode", "model", "device", "batch_size", "images", "weights")
STATUSES = ("ok", "skipped", "failed")
GATES = ("pass", "fail", "skipped")


@dataclass
class StepResult:
    """One step of one ablation: what ran, how fast, how accurate, and where."""

    model: str
    device: str
    batch_size: int
    step: str  # the step's name in the plan, e.g. "bf16"
    index: int  # position in the plan
    patches: list[str]  # every patch applied in this step, in application order
    status: str  # ok | skipped | failed
    gate: str  # pass | fail | skipped
    weights: str  # e.g. "random(seed=0)" or "sam_tiny.safetensors sha256:..."
    plan: str = ""
    plan_hash: str = ""
    mode: str = "cumulative"
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)  # each patch's revision (`Patch.revision`)
    workload: dict[str, Any] = field(default_factory=lambda: {"name": "points"})  # what was timed, its settings
    reason: str | None = None  # why skipped / failed
    images: int = 0
    prompts_per_image: float = 0.0
    img_s: float | None = None
    latency_ms_p50: float | None = None  # per image (interactive: a new image's encoder call and first click)
    latency_ms_p90: float | None = None
    click_ms_p50: float | None = None  # the interactive workload: one prompt decoded alone (null otherwise)
    click_ms_p90: float | None = None
    encoder_ms: float | None = None  # image encoder time per image (its batch's encoder time / real images)
    encoder_tflop_s: float | None = None  # samrepro.flops' count of the unpatched encoder / encoder time
    peak_mem_mib: float | None = None  # CUDA max allocated, or CPU peak RSS
    peak_mem_reserved_mib: float | None = None  # CUDA only
    compile_s: float | None = None  # warm-up (compile) seconds, not timed
    miou_gt: float | None = None  # null without ground truth
    miou_agreement: float | None = None  # vs the fp32 step's own masks
    embedding_sqnr_db: float | None = None
    # the AMG workload (null otherwise): masks kept per image, and against the fp32 step's masks: mean IoU of each
    # fp32 mask's best match, the share matched at IoU >= 0.5, masks per image gained (+) or lost (-)
    amg_masks_per_image: float | None = None
    amg_matched_miou: float | None = None
    amg_match_share: float | None = None
    amg_mask_count_diff: float | None = None
    amg_fp32_masks: int | None = None  # the fp32 masks matched against; too few and they are not gated
    tolerance: dict[str, float] = field(default_factory=dict)  # what the gate checked
    tolerance_source: str = ""  # declared, or tightened by a plan bound calibrated on this workload
    gate_violations: list[str] = field(default_factory=list)
    changes_weights: bool = False
    kernel_paths: dict[str, int] = field(default_factory=dict)  # e.g. {"triton_attn.kernel": 96}
    env: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # traceback of a failed step
    started_at: str = ""
    finished_at: str = ""
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepResult:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"StepResult schema {data.get('schema')!r} is not {SCHEMA}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def filename(self) -> str:
        return f"step_{self.index:02d}_{self.step}.json"

    @property
    def is_amg(self) -> bool:
        return self.workload.get("name") == "amg"


def utc_now() -> str:
    """A StepResult timestamp: UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write(result: StepResult, folder: Path) -> Path:
    """Write atomically (see `write_json`) as FOLDER/step_NN_name.json."""
    return write_json(Path(folder) / result.filename(), result.to_dict())


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write as JSON, atomically (`write_bytes`)."""
    return write_bytes(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True).encode())


def write_bytes(path: Path, data: bytes) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: Path) -> StepResult:
    return StepResult.from_dict(json.loads(Path(path).read_text()))


def read_all(folder: Path) -> list[StepResult]:
    """Every readable StepResult in a folder (temp files are never read), in plan order; an unreadable
    one is named on stderr and left out, so a report or log of the rest still works."""
    out = []
    for path in Path(folder).glob("step_*.json"):
        try:
            out.append(read(path))
        except (ValueError, TypeError, OSError) as e:  # JSONDecodeError is a ValueError
            print(f"samrepro: warning: skipping unreadable step result {path}: {e}", file=sys.stderr)
    return sorted(out, key=lambda r: r.index)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists become JSON text."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat |= flatten(v, key)
        else:
            flat[key] = json.dumps(v) if isinstance(v, list | tuple) else v
    return flat


def plan_name(plan: dict[str, Any]) -> str:
    """The plan's name; plan.json holds the whole normalised plan under "plan"."""
    value = plan.get("plan")
    return value.get("name", "") if isinstance(value, dict) else str(value)


def env_fields(env: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A StepResult's environment as dotted keys, without the plan it embeds (plan.json holds that)."""
    return flatten({k: v for k, v in env.items() if k != "plan"}, prefix)


def read_plan(results_dir: Path, step_results: list[StepResult]) -> dict[str, Any]:
    """plan.json's keys, with those it lacks taken from the first StepResult."""
    info = {k: getattr(step_results[0], k) for k in PLAN_KEYS} if step_results else {}
    path = Path(results_dir) / PLAN_FILE
    if path.exists():
        info |= json.loads(path.read_text())
    return info


def baseline(step_results: list[StepResult]) -> StepResult | None:
    """The fp32 step: the first one that ran with no patches."""
    return next((r for r in step_results if r.status == "ok" and not r.patches), None)
