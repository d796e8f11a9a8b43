"""Markdown report and waterfall charts from a results folder; the same inputs give byte-identical files."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from samrepro import results
from samrepro.results import StepResult

PLAN_FILE = "plan.json"  # written by the runner
PLAN_KEYS = ("plan", "plan_hash", "mode", "model", "device", "batch_size", "images", "weights")
CHARTS = {  # file stem -> (StepResult field, axis label, title)
    "throughput": ("img_s", "images / s", "Throughput per step"),
    "memory": ("peak_mem_mib", "peak memory (MiB)", "Peak memory per step"),
}
GATE_COLORS = {"pass": "#3b7d4f", "fail": "#c0392b", "skipped": "#8c8c8c"}
RANDOM_BANNER = "> [!WARNING]\n> **random weights: ground-truth mIoU is meaningless**"


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


def write_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, throughput.{png,svg} and memory.{png,svg} into `out_dir` (default results_dir/report).

    Returns the path of report.md.
    """
    results_dir = Path(results_dir)
    step_results = results.read_all(results_dir)
    if not step_results:
        raise ValueError(f"no step_*.json in {results_dir}")
    plan = read_plan(results_dir, step_results)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, (metric, label, title) in CHARTS.items():
        _chart(step_results, metric, label, f"{title}: {_heading(plan)}", out_dir / stem)
    path = out_dir / "report.md"
    path.write_text(render(step_results, plan))
    return path


def baseline(step_results: list[StepResult]) -> StepResult | None:
    """The fp32 step: the first one that ran with no patches."""
    return next((r for r in step_results if r.status == "ok" and not r.patches), None)


def render(step_results: list[StepResult], plan: dict[str, Any]) -> str:
    """The markdown text of the report."""
    base = baseline(step_results)
    weights = sorted({r.weights for r in step_results})
    lines = [f"# samrepro report: {_heading(plan)}", ""]
    if any(w.startswith("random") for w in weights):
        lines += [RANDOM_BANNER, ""]
    lines += [
        f"- model `{plan.get('model')}` on `{plan.get('device')}`, batch size {plan.get('batch_size')}, "
        f"{plan.get('images')} images, plan hash `{plan.get('plan_hash')}`",
        f"- weights: {', '.join(f'`{w}`' for w in weights)}",
    ]
    started = sorted(r.started_at for r in step_results if r.started_at)
    finished = sorted(r.finished_at for r in step_results if r.finished_at)
    if started and finished:
        lines.append(f"- ran from {started[0]} to {finished[-1]}")
    lines += ["", *(f"![{CHARTS[s][2]}]({s}.svg)" for s in CHARTS), "", "## Steps", "", *_table(step_results, base), ""]
    lines.append(
        f"Speed-up is over the fp32 step `{base.step}`." if base else "No fp32 step (one without patches) ran."
    )
    lines.append(
        "Latency is per image; mIoU GT is mIoU with center-point prompts against ground truth; agreement mIoU and "
        "SQNR compare with the fp32 model's masks and image embeddings."
    )
    changed = [r.step for r in step_results if r.changes_weights]
    if changed:
        lines += [
            "",
            f"> **Note:** {', '.join(f'`{s}`' for s in changed)} change weight values (quantization or sparsity): "
            "part of their accuracy change comes from the weights themselves, and MLPerf's Closed division would "
            "not accept them.",
        ]
    done = {r.step for r in step_results}
    missing = [s["name"] for s in plan.get("plan", {}).get("steps", []) if s["name"] not in done]
    if missing:
        lines += [
            "",
            f"> **Not run:** {', '.join(f'`{s}`' for s in missing)} of the plan left no StepResult (the sweep was "
            "stopped or is still running); rerunning the same command into this folder resumes there.",
        ]
    failed = [r for r in step_results if r.error]
    if failed:
        lines += ["", "## Errors"]
        for r in failed:
            lines += ["", f"<details><summary>{r.step}</summary>", "", "```", r.error.rstrip(), "```", "</details>"]
    lines += ["", "## Environment", "", "| key | value |", "|---|---|", *_env_rows(step_results)]
    command = plan.get("command")
    if command:
        command = shlex.join(command) if isinstance(command, list) else command
        lines += ["", "## Command", "", "```sh", command, "```"]
    return "\n".join(lines) + "\n"


def _heading(plan: dict[str, Any]) -> str:
    return f"{plan_name(plan)} ({plan.get('mode')}), {plan.get('model')} on {plan.get('device')}"


def _table(step_results: list[StepResult], base: StepResult | None) -> list[str]:
    head = (
        "step | patches | status | img/s | speed-up | p50 ms | p90 ms | encoder ms | encoder speed-up | "
        "encoder TFLOP/s | peak MiB | compile s | mIoU GT | "
        "agreement mIoU | SQNR dB | gate | tolerance | violations | kernel paths | reason"
    ).split(" | ")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in step_results:
        speedup = r.img_s / base.img_s if base and base.img_s and r.img_s is not None else None
        enc_speedup = base.encoder_ms / r.encoder_ms if base and base.encoder_ms and r.encoder_ms else None
        cells = [
            r.step,
            ", ".join(r.patches) or "(none)",
            r.status,
            _num(r.img_s, ".1f" if (r.img_s or 0) >= 10 else ".3g"),  # CPU vit rates are ~0.05 img/s
            _num(speedup, ".2f", "x"),
            _num(r.latency_ms_p50, ".2f"),
            _num(r.latency_ms_p90, ".2f"),
            _num(r.encoder_ms, ".2f"),
            _num(enc_speedup, ".2f", "x"),
            _num(r.encoder_tflop_s, ".3g"),
            _num(r.peak_mem_mib, ".0f"),
            _num(r.compile_s, ".1f"),
            _num(r.miou_gt, ".4f"),
            _num(r.miou_agreement, ".4f"),
            _num(r.embedding_sqnr_db, ".1f"),
            "**FAIL**" if r.gate == "fail" else r.gate,
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.tolerance.items())),
            "; ".join(r.gate_violations),
            ", ".join(f"{k}={v}" for k, v in sorted(r.kernel_paths.items())),
            r.reason or "",
        ]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _env_rows(step_results: list[StepResult]) -> list[str]:
    """One row per environment key; a key whose value differs between steps lists each step's value."""
    flats = [(r.step, env_fields(r.env)) for r in step_results]
    rows = []
    for key in sorted({k for _, flat in flats for k in flat}):
        values = {step: flat.get(key) for step, flat in flats}
        distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
        shown = (
            str(next(iter(values.values())))
            if len(distinct) == 1
            else "; ".join(f"{s}: {v}" for s, v in values.items())
        )
        rows.append(f"| {_cell(key)} | {_cell(shown)} |")
    return rows


def _num(v: float | None, fmt: str, suffix: str = "") -> str:
    if v is None:
        return "—"
    return str(v) if not math.isfinite(v) else f"{v:{fmt}}{suffix}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _chart(step_results: list[StepResult], metric: str, ylabel: str, title: str, stem: Path) -> None:
    """One bar per step in plan order; a step that did not run is an empty slot labelled with its status."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = [getattr(r, metric) if r.status == "ok" else None for r in step_results]
    top = max((v for v in values if v is not None and math.isfinite(v)), default=1.0)
    with matplotlib.rc_context({"svg.hashsalt": "samrepro", "svg.fonttype": "path"}):
        fig = Figure(figsize=(max(6.0, 1.1 * len(step_results) + 2), 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = range(len(step_results))
        ax.bar(xs, [v or 0.0 for v in values], color=[GATE_COLORS[r.gate] for r in step_results])
        for x, r, v in zip(xs, step_results, values):
            label = r.status if r.status != "ok" else "n/a" if v is None else f"{v:,.1f}" if v >= 10 else f"{v:.3g}"
            ax.annotate(label, (x, v or 0.0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(list(xs), [r.step for r in step_results], rotation=30, ha="right")
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        gates = sorted({r.gate for r in step_results})
        ax.legend(handles=[Patch(color=GATE_COLORS[g], label=f"gate {g}") for g in gates], fontsize=8)
        fig.savefig(stem.with_suffix(".png"), dpi=120)
        fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})
