"""Sweep files: a matrix of ablations that `samrepro sweep` runs as Ray tasks (sweep_run.py).

A sweep file (TOML); every ablation of models x devices x (plans + patch lists) x batch sizes x modes runs:

    name = "tiny-cpu"                   # default: the file's stem
    results = "results/sweeps/tiny-cpu" # default: results/sweeps/NAME
    models = ["tiny"]                   # tiny, vit_b, vit_l, vit_h
    devices = ["cpu"]                   # cpu or cuda: a CUDA step gets one GPU from Ray
    plans = ["cpu"]                     # plan names or .toml paths, as `samrepro ablate --plan`
    patches = [["sync_free", "sdpa"]]   # ad hoc plans, as `--patches`: fp32, then one step per patch
    batch_sizes = [1, 2]
    modes = ["cumulative"]              # default: cumulative
    images = 8                          # then as `samrepro ablate`: images, prompts, weights, data, profile
    cpus_per_step = 1                   # CPUs each step reserves (Ray sets its threads to match); default 1
    retries = 0                         # times Ray reruns a step whose worker died; default 0: recorded as failed

Paths (results, plans, weights, data) are relative to the working directory, as on the command line.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samrepro.inputs import UsageError
from samrepro.models import MODELS
from samrepro.plans import MODES, PlanError, find_plan, find_toml, shipped_plans_dir

DEVICES = ("cpu", "cuda")  # no cuda:N: Ray picks the GPU
KEYS = {  # key -> its TOML type, as an error message names it
    "name": (str, "a string"),
    "results": (str, "a string"),
    "models": (list, "a list"),
    "devices": (list, "a list"),
    "plans": (list, "a list"),
    "patches": (list, "a list"),
    "batch_sizes": (list, "a list"),
    "modes": (list, "a list"),
    "images": (int, "an integer"),
    "prompts": (int, "an integer"),
    "weights": (str, "a string"),
    "data": (str, "a string"),
    "profile": (bool, "true or false"),
    "cpus_per_step": (int, "an integer"),
    "retries": (int, "an integer"),
}
REQUIRED = ("models", "devices", "batch_sizes")
SWEEPS = "sweeps"  # under ablations/, beside the plans


class SweepError(UsageError):
    """A sweep file is malformed; the message names the file and the key, and what is valid."""


@dataclass(frozen=True)
class Cell:
    """One ablation of the matrix: a plan (name or path) or a list of patches, on one model, device and batch."""

    model: str
    device: str
    plan: str | None
    patches: tuple[str, ...] | None
    mode: str
    batch_size: int

    @property
    def label(self) -> str:
        """The cell as error messages name it."""
        which = f"patches {','.join(self.patches)}" if self.patches else f"plan {self.plan}"
        return f"{self.model} {self.device} {which} {self.mode} batch {self.batch_size}"


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    results: Path
    models: list[str]
    devices: list[str]
    batch_sizes: list[int]
    plans: list[str] = field(default_factory=list)
    patches: list[list[str]] = field(default_factory=list)
    modes: list[str] = field(default_factory=lambda: ["cumulative"])
    images: int = 32
    prompts: int | None = None
    weights: str | None = None
    data: str = "synthetic"
    profile: bool = False
    cpus_per_step: int = 1
    retries: int = 0

    def cells(self) -> list[Cell]:
        """Every ablation, in the file's order (models outermost)."""
        which = [(p, None) for p in self.plans] + [(None, tuple(p)) for p in self.patches]
        product = itertools.product(self.models, self.devices, which, self.batch_sizes, self.modes)
        return [Cell(m, d, plan, patches, mode, bs) for m, d, (plan, patches), bs, mode in product]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"results": str(self.results)}


def shipped_sweeps_dir() -> Path:
    return shipped_plans_dir() / SWEEPS


def find_sweep(name_or_path: str) -> Path:
    """A sweep file from a path, or a name looked up in ./ablations/sweeps then the shipped sweeps."""
    try:
        return find_toml(name_or_path, [Path.cwd() / "ablations" / SWEEPS, shipped_sweeps_dir()], "sweep")
    except LookupError as e:
        raise SweepError(str(e)) from None


def load(path: Path) -> Sweep:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: cannot read the sweep file: {e}") from None
    return parse(data, str(path), default_name=path.stem)


def parse(data: dict[str, Any], source: str = "<sweep>", default_name: str = "sweep") -> Sweep:
    """Validate a sweep's raw table; every message names the source and the offending key."""
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {unknown}; valid: {sorted(KEYS)}")
    for key, (kind, what) in KEYS.items():
        if key in data and (not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool))):
            raise SweepError(f"{source}: {key} must be {what}, got {data[key]!r}")
    missing = [k for k in REQUIRED if not data.get(k)]
    if missing or not (data.get("plans") or data.get("patches")):
        need = ", ".join(missing or ["plans or patches"])
        raise SweepError(f"{source}: missing or empty {need}; required: {', '.join(REQUIRED)}, and plans or patches")
    name = data.get("name", default_name)
    images = data.get("images", 32)
    for key in ("images", "prompts", "cpus_per_step"):
        if key in data and data[key] < 1:
            raise SweepError(f"{source}: {key} must be a positive integer, got {data[key]}")
    if data.get("retries", 0) < 0:
        raise SweepError(f"{source}: retries must be 0 or more, got {data['retries']}")
    _choices(data, "models", MODELS, source)
    _choices(data, "devices", DEVICES, source, hint=" (Ray gives each CUDA step a GPU: no cuda:N)")
    _choices(data, "modes", MODES, source)
    for bs in _unique(data, "batch_sizes", source):
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise SweepError(f"{source}: batch_sizes must be positive integers, got {bs!r}")
        if bs > images:
            raise SweepError(f"{source}: batch size {bs} > images {images}; raise images or drop the batch size")
    for plan in _unique(data, "plans", source):
        if not isinstance(plan, str):
            raise SweepError(f"{source}: plans must be plan names or .toml paths, got {plan!r}")
        try:
            find_plan(plan)
        except PlanError as e:
            raise SweepError(f"{source}: plans: {e}") from None
    for patches in _unique(data, "patches", source):
        if not isinstance(patches, list) or not patches or not all(isinstance(p, str) for p in patches):
            raise SweepError(f"{source}: patches must be non-empty lists of patch names, got {patches!r}")
    return Sweep(
        name=name,
        source=source,
        results=Path(data.get("results", Path("results") / "sweeps" / name)),
        **{k: data[k] for k in KEYS if k not in ("name", "results") and k in data},
    )


def _unique(data: dict[str, Any], key: str, source: str) -> list[Any]:
    values = data.get(key, [])
    if any(values.count(v) > 1 for v in values):
        raise SweepError(f"{source}: {key} lists a value twice: {values}")
    return values


def _choices(data: dict[str, Any], key: str, valid: tuple[str, ...], source: str, hint: str = "") -> None:
    bad = [v for v in _unique(data, key, source) if v not in valid]
    if bad:
        raise SweepError(f"{source}: unknown {key} {bad}; valid: {', '.join(valid)}{hint}")
