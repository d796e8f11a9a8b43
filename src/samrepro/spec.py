"""StepSpec: what the runner asks of one step process, written as specs/<step>.json and read back by the step.

The runner and the step share this one type: the runner writes it and builds the StepResult of a step that never
started from it (skipped, bad config, crashed process); the step process reads it and starts its StepResult from
it. The plan itself is stored once, in the results folder's plan.json; a spec names it and carries its hash.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samrepro import results
from samrepro.registry import get_patch, list_patches
from samrepro.results import StepResult

SCHEMA = 1
# What the fp32 baseline shares with every later step of a run: a baseline measured otherwise is not compared.
INPUT_KEYS = ("model", "device", "batch_size", "images", "prompts", "weights", "weights_sha256", "data", "workload")
# The workload of specs and baselines written before workloads had names: the point-prompt one.
POINTS_WORKLOAD = {"name": "points"}
VOLATILE = ("results_dir", "cache_dir", "profile")  # where and how it is stored, not what it measures


@dataclass(frozen=True)
class StepSpec:
    model: str
    device: str
    batch_size: int
    images: int
    prompts: int | None  # at most this many prompts per image; None: all
    weights: str | None  # "random", a checkpoint path, or None: tiny's shipped weights
    weights_sha256: str | None
    data: str
    plan: str  # the plan's name; the plan is in plan.json
    plan_hash: str
    mode: str  # cumulative | isolated
    index: int
    step: str
    patches: list[str]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)  # each registered patch's `Patch.revision`
    tolerance: dict[str, float] = field(default_factory=dict)  # a plan bound over the declared tolerances
    tolerance_source: str = ""
    note: str | None = None  # the plan's note for this step, kept as the result's reason
    results_dir: str = ""
    cache_dir: str = ""
    profile: bool = False
    # what is timed and compared (workloads.py): {"name": ...} and every setting it runs with
    workload: dict[str, Any] = field(default_factory=lambda: dict(POINTS_WORKLOAD))
    schema: int = SCHEMA

    def inputs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in INPUT_KEYS}

    def key(self) -> dict[str, Any]:
        """What the step measures: two specs with the same key answer the same question (resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in VOLATILE}

    def result(self, **fields: Any) -> StepResult:
        """A StepResult of this step, not yet run: failed and ungated unless `fields` say otherwise."""
        start = {"status": "failed", "gate": "skipped", "reason": self.note} | fields
        return StepResult(
            model=self.model,
            device=self.device,
            batch_size=self.batch_size,
            step=self.step,
            index=self.index,
            patches=list(self.patches),
            weights=self.weights or "shipped tiny weights",
            plan=self.plan,
            plan_hash=self.plan_hash,
            mode=self.mode,
            configs=self.configs,
            revisions=self.revisions,
            workload=self.workload,
            **start,
        )

    def write(self, path: Path) -> None:
        results.write_json(path, dataclasses.asdict(self))

    @staticmethod
    def revisions_of(names: list[str]) -> dict[str, int]:
        registered = set(list_patches())
        return {n: get_patch(n).revision for n in names if n in registered}

    @classmethod
    def read(cls, path: Path) -> StepSpec:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"step spec schema {data.get('schema')!r} is not {SCHEMA}")
        return cls(**data)
