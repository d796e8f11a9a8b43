"""Ablation plans as data: TOML files listing steps of patches, resolved into per-step patch sets.

A plan file:

    name = "blog"
    description = "..."

    [[steps]]
    name = "fp32"            # the first step is the fp32 baseline: no patches
    [[steps]]
    name = "sparse24"
    add = ["sparse24"]       # patches this step adds
    remove = ["int8_dynamic"]  # cumulative mode: patches of earlier steps this one takes off
    base = ["bf16"]          # isolated mode: what this step's patches need under them
    [steps.config.sparse24]  # per-patch config, passed to the patch's config class
    ...
    [steps.tolerance]        # a plan bound: demand more than the patches' composed declared tolerance
    agreement_miou_min = 0.99

    [calibrated]             # where the plan bounds were measured; elsewhere they are reported, not gated
    models = ["vit_b"]       # each key optional: models, data, batch_size, weights, workload
    data = "noise:8"
    batch_size = 16
    weights = "random"
    evidence = "reports/..."  # where the measurement that justifies the bounds lives
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samrepro.patch import Tolerance

MODES = ("cumulative", "isolated")
PLAN_KEYS = {"name", "description", "steps", "calibrated"}
CALIBRATED_KEYS = {"models", "data", "batch_size", "weights", "workload", "evidence"}
STEP_KEYS = {"name", "description", "add", "remove", "base", "config", "tolerance"}
TOLERANCE_KEYS = {f.name for f in dataclasses.fields(Tolerance)}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # step names become file names
PLANS_DIR = Path(__file__).resolve().parents[2] / "ablations"  # the source checkout's plans (editable install)


class PlanError(ValueError):
    """A plan file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Step:
    """One step of a plan, as written."""

    name: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    base: tuple[str, ...] = ()
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    steps: tuple[Step, ...]
    source: str = ""  # the file it came from, for messages
    calibrated: dict[str, Any] = field(default_factory=dict)  # the workload its step bounds were measured on

    def bounds_apply(self, run: dict[str, Any]) -> str | None:
        """None when the plan's step bounds were calibrated on this run's workload, else why not. Calibrated bounds
        hold for the points workload unless `workload` names another."""
        calibrated = {"workload": "points"} | self.calibrated if self.calibrated else {}
        for key, want in calibrated.items():
            if key == "evidence":
                continue
            if key == "workload":
                have = run.get("workload", {"name": "points"})["name"]
            else:
                have = run["model"] if key == "models" else run[key]
            if (have not in want) if key == "models" else (have != want):
                return f"plan bounds were calibrated on {key} {want}, this run has {have}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The normalised plan: what its hash covers."""
        steps = [
            {
                "name": s.name,
                "description": s.description,
                "add": list(s.add),
                "remove": list(s.remove),
                "base": list(s.base),
                "config": s.config,
                "tolerance": s.tolerance,
            }
            for s in self.steps
        ]
        out = {"name": self.name, "description": self.description, "steps": steps}
        return out | ({"calibrated": self.calibrated} if self.calibrated else {})  # old plans keep their hash

    def hash(self) -> str:
        return hash_plan(self.to_dict())


@dataclass(frozen=True)
class ResolvedStep:
    """A step as it will run in one mode on one device."""

    index: int
    name: str
    patches: tuple[str, ...]  # registry order is applied later, by apply_patches
    configs: dict[str, dict[str, Any]]
    tolerance: dict[str, float]  # overrides
    skip_reason: str | None = None
    note: str | None = None  # e.g. which earlier skipped patches a cumulative step runs without

    @property
    def baseline(self) -> bool:
        return self.index == 0


def hash_plan(plan: dict[str, Any]) -> str:
    """sha256 of the plan's canonical JSON."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def shipped_plans_dir() -> Path:
    """The plans shipped with samrepro: the checkout's ablations/, or the installed package's copy of it."""
    return PLANS_DIR if PLANS_DIR.is_dir() else Path(__file__).resolve().parent / "ablations"


def available_plans() -> list[str]:
    return _names_in([Path.cwd() / "ablations", shipped_plans_dir()])


def find_plan(name_or_path: str) -> Path:
    """A plan file from a path, or a name looked up in ./ablations then the checkout's ablations/."""
    try:
        return find_toml(name_or_path, [Path.cwd() / "ablations", shipped_plans_dir()], "plan")
    except LookupError as e:
        raise PlanError(str(e)) from None


def find_toml(name_or_path: str, folders: list[Path], kind: str) -> Path:
    """`name_or_path` if it is a file (or names one), else FOLDER/NAME.toml from the first folder that has it;
    LookupError naming the valid names otherwise."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise LookupError(f"{kind} file not found: {path}")
        return path
    for folder in folders:
        if (folder / f"{name_or_path}.toml").is_file():
            return folder / f"{name_or_path}.toml"
    raise LookupError(f"unknown {kind} {name_or_path!r}; valid: {', '.join(_names_in(folders)) or '(none found)'}")


def _names_in(folders: list[Path]) -> list[str]:
    return sorted({p.stem for d in folders if d.is_dir() for p in d.glob("*.toml")})


def load(path: Path) -> Plan:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
        raise PlanError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the plan: {e}") from None
    return parse(data, str(path))


def adhoc(patches: list[str]) -> Plan:
    """fp32, then one step per patch, named after it: the plan of `samrepro ablate --patches a,b`."""
    steps = [{"name": "fp32"}, *({"name": p, "add": [p]} for p in patches)]
    return parse({"name": f"patches-{'+'.join(patches)}", "steps": steps}, "--patches")


def parse(data: dict[str, Any], source: str = "<plan>") -> Plan:
    """Validate a plan's raw table; every message names the source and the offending key."""
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise PlanError(f"{source}: unknown top-level field(s) {unknown}; valid: {sorted(PLAN_KEYS)}")
    name = _string(data, "name", source, required=True)
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PlanError(f"{source}: 'steps' must be a non-empty array of tables ([[steps]])")
    steps = [_parse_step(raw, i, source) for i, raw in enumerate(raw_steps)]
    _check_steps(steps, source)
    calibrated = _calibrated(data.get("calibrated", {}), source)
    description = _string(data, "description", source)
    return Plan(name=name, description=description, steps=tuple(steps), source=source, calibrated=calibrated)


def _calibrated(table: Any, source: str) -> dict[str, Any]:
    where = f"{source}: calibrated"
    _known_keys(table, CALIBRATED_KEYS, where)
    if "models" in table:
        _names(table, "models", where)
    if "batch_size" in table and (isinstance(table["batch_size"], bool) or not isinstance(table["batch_size"], int)):
        raise PlanError(f"{where}.batch_size: must be an integer, got {table['batch_size']!r}")
    for key in ("data", "weights", "workload", "evidence"):
        if key in table:
            _string(table, key, where)
    return dict(table)


def _parse_step(raw: Any, i: int, source: str) -> Step:
    where = f"{source}: steps[{i}]"
    _known_keys(raw, STEP_KEYS, where)
    name = _string(raw, "name", where, required=True)
    if not NAME_RE.match(name):
        raise PlanError(f"{where}.name: {name!r} must be letters, digits, '_', '-' or '.'")
    where = f"{source}: step {name!r}"
    lists = {key: _names(raw, key, where) for key in ("add", "remove", "base")}
    config = raw.get("config", {})
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise PlanError(f"{where}.config: must be a table of tables, one per patch ([steps.config.PATCH])")
    stray = sorted(set(config) - set(lists["add"]) - set(lists["base"]))
    if stray:
        raise PlanError(f"{where}.config: config for patch(es) {stray} that this step does not add")
    tolerance = raw.get("tolerance", {})
    if not isinstance(tolerance, dict):
        raise PlanError(f"{where}.tolerance: must be a table")
    bad = sorted(set(tolerance) - TOLERANCE_KEYS)
    if bad:
        raise PlanError(f"{where}.tolerance: unknown key(s) {bad}; valid: {sorted(TOLERANCE_KEYS)}")
    for key, value in tolerance.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlanError(f"{where}.tolerance.{key}: must be a number, got {value!r}")
    try:
        Tolerance(**tolerance)
    except ValueError as e:
        raise PlanError(f"{where}.tolerance: {e}") from None
    return Step(
        name=name,
        config={k: dict(v) for k, v in config.items()},
        tolerance={k: float(v) for k, v in tolerance.items()},
        description=_string(raw, "description", where),
        **{k: tuple(v) for k, v in lists.items()},
    )


def _check_steps(steps: list[Step], source: str) -> None:
    first = steps[0]
    if first.add or first.base or first.remove:
        raise PlanError(f"{source}: step {first.name!r}: the first step is the fp32 baseline and takes no patches")
    seen: set[str] = set()
    active: set[str] = set()
    for step in steps:
        where = f"{source}: step {step.name!r}"
        if step.name in seen:
            raise PlanError(f"{where}: duplicate step name")
        seen.add(step.name)
        never = sorted(set(step.remove) - active)
        if never:
            raise PlanError(f"{where}.remove: {never} never added by an earlier step")
        active = (active - set(step.remove)) | set(step.add)


def resolve(plan: Plan, mode: str, unavailable: Callable[[list[str]], str | None]) -> list[ResolvedStep]:
    """The patch set of every step; `unavailable(patches)` says why they cannot run here (None: they can).

    cumulative: step k runs the adds of steps <= k minus their removes. A step whose own patches cannot run is
    skipped and changes nothing: later steps go on without its patches (noted on them).
    isolated: step k runs its `base` plus its own `add`.
    """
    if mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    out: list[ResolvedStep] = []
    active: dict[str, dict[str, Any]] = {}  # patch -> config, in the order added
    dropped: list[str] = []  # cumulative: patches left out because their step was skipped
    for i, step in enumerate(plan.steps):
        if mode == "isolated":
            names = list(dict.fromkeys(step.base + step.add))
            configs = {n: step.config[n] for n in names if n in step.config}
            out.append(_resolved(i, step, names, configs, unavailable(names) if names else None, None))
            continue
        after = {n: c for n, c in active.items() if n not in step.remove}
        again = sorted(set(step.add) & set(after))
        if again:
            raise PlanError(f"{plan.source}: step {step.name!r}.add: {again} already active; cumulative mode adds once")
        after |= {n: step.config.get(n, {}) for n in step.add}
        reason = unavailable(list(step.add)) if step.add else None
        configs = {n: c for n, c in after.items() if c}
        if reason:
            out.append(_resolved(i, step, list(after), configs, reason, None))
            dropped += [n for n in step.add if n not in dropped]
            continue
        active = after
        dropped = [d for d in dropped if d not in step.remove]
        note = f"runs without {', '.join(dropped)} (skipped earlier)" if dropped else None
        out.append(_resolved(i, step, list(active), configs, None, note))
    return out


def tolerance_spec(step: ResolvedStep, bounds_off: str | None) -> dict[str, Any]:
    """The plan bound a step is gated with, and a line saying where its tolerance comes from; `bounds_off` says
    why the plan's bounds do not hold on this workload (`Plan.bounds_apply`), None where they were calibrated."""
    if not step.tolerance:
        return {"tolerance": {}, "tolerance_source": "declared (the patches' composed tolerances)"}
    bound = ", ".join(f"{k}={v:g}" for k, v in sorted(step.tolerance.items()))
    if bounds_off:
        return {"tolerance": {}, "tolerance_source": f"declared; plan bound {bound} not applied: {bounds_off}"}
    return {"tolerance": step.tolerance, "tolerance_source": f"declared, tightened by the plan: {bound}"}


def _resolved(
    i: int, step: Step, names: list[str], configs: dict[str, dict[str, Any]], reason: str | None, note: str | None
) -> ResolvedStep:
    return ResolvedStep(i, step.name, tuple(names), configs, dict(step.tolerance), reason, note)


def _known_keys(table: Any, keys: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise PlanError(f"{where}: must be a table")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; valid: {sorted(keys)}")


def _string(table: dict, key: str, where: str, required: bool = False) -> str:
    value = table.get(key, "" if not required else None)
    if value is None:
        raise PlanError(f"{where}: missing required key {key!r}")
    if not isinstance(value, str):
        raise PlanError(f"{where}.{key}: must be a string, got {value!r}")
    return value


def _names(table: dict, key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{where}.{key}: must be a list of patch names, got {value!r}")
    if len(set(value)) != len(value):
        raise PlanError(f"{where}.{key}: a patch is listed twice in {value}")
    return value
