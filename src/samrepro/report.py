"""Markdown report and waterfall charts from a results folder; the same inputs give byte-identical files."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from samrepro import published, results
from samrepro.results import StepResult, baseline, env_fields, plan_name, read_plan
from samrepro.speed_limits import markdown, speed_limits

CHARTS = {  # file stem -> (StepResult field, axis label, title)
    "throughput": ("img_s", "images / s", "Throughput per step"),
    "memory": ("peak_mem_mib", "peak memory (MiB)", "Peak memory per step"),
}
GATE_COLORS = {"pass": "#3b7d4f", "fail": "#c0392b", "skipped": "#8c8c8c"}
RANDOM_BANNER = "> [!WARNING]\n> **random weights: ground-truth mIoU is meaningless**"
SLOWER = "▼"  # marks, in the table, a step slower than the step before it
LOG_WORDS = re.compile(r"compile|autotune|graph break|fallback", re.IGNORECASE)  # "compile" covers recompile
LOG_TAIL = 10  # matching log lines quoted per regression


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
    path.write_text(render(step_results, plan, results_dir / "logs"))
    return path


def measured(step_results: list[StepResult]) -> list[StepResult]:
    """Steps that ran and have a finite img/s."""
    return [r for r in step_results if r.status == "ok" and r.img_s is not None and math.isfinite(r.img_s)]


def regressions(step_results: list[StepResult], mode: str | None) -> list[tuple[StepResult, StepResult]]:
    """(step, the measured step before it) for each step with a lower img/s; only in cumulative mode, where each
    step adds patches to the one before."""
    if mode != "cumulative":
        return []
    done = measured(step_results)
    return [(r, prev) for prev, r in zip(done, done[1:]) if r.img_s < prev.img_s]


def verdict(step_results: list[StepResult], base: StepResult | None, plan: dict[str, Any]) -> list[str]:
    """The report's first lines: best step and its speed-up, gates, weights, data, time spent."""
    eligible = [r for r in measured(step_results) if r.gate == "pass" or r is base]
    best = max(eligible, key=lambda r: r.img_s, default=None)  # the first of equals
    if best is None:
        lines = ["- **best step: none** (no step passed its gate and no fp32 reference ran)"]
    else:
        over = "no fp32 step to compare with"
        if base and base.img_s:
            over = f"{best.img_s / base.img_s:.2f}x over fp32 (`{base.step}`, {_rate(base.img_s)} img/s)"
        lines = [
            f"- **best step: `{best.step}`**, {_rate(best.img_s)} img/s, {over}; "
            "best = highest img/s among steps whose gate passed, and the fp32 reference"
        ]
    gates = {g: [r.step for r in step_results if r.gate == g] for g in results.GATES}
    failed = f"; failed: {', '.join(f'`{s}`' for s in gates['fail'])}" if gates["fail"] else ""
    weights = ", ".join(f"`{w}`" for w in sorted({r.weights for r in step_results}))
    if any(r.weights.startswith("random") for r in step_results):
        weights = f"**RANDOM ({weights}): accuracy against ground truth (mIoU GT) is meaningless**"
    labels = sorted({str(r.env["data"]) for r in step_results if r.env.get("data")}) or [plan.get("data")]
    data = ", ".join(f"`{d}`" for d in labels if d) or "not recorded"
    compile_s = sum(r.compile_s for r in step_results if r.compile_s is not None and math.isfinite(r.compile_s))
    wall_s = sum(_wall_s(r) for r in step_results)
    return lines + [
        f"- **gates:** {len(gates['pass'])} passed, {len(gates['fail'])} failed, {len(gates['skipped'])} skipped"
        + failed,
        f"- **weights:** {weights}",
        f"- **data:** {data}; {plan.get('images')} images, " + _size(plan, step_results),
        f"- **time:** {_duration(compile_s)} compiling (sum of compile s), "
        f"{_duration(wall_s)} wall time of all steps (sum of each one's start to finish)",
    ]


def published_comparison(step_results: list[StepResult], base: StepResult | None, plan: dict[str, Any]) -> list[str]:
    """Each measured step beside the published figures of the same step and model, and the sources' labels."""
    model, batch_size, device = str(plan.get("model")), int(plan.get("batch_size") or 0), str(plan.get("device"))
    if is_amg(plan, step_results):
        return ["No published figure: the sources timed point prompts, not automatic mask generation."]
    if workload_name(plan, step_results) == "interactive":
        return ["No published figure: the sources timed batches of point prompts, not one click at a time."]
    if model in published.OWN_MODELS:
        return [f"No published figure ({model} is samrepro's own model)."]
    if model not in published.models():
        return [f"No published figure for {model}: the sources measured only {', '.join(sorted(published.models()))}."]
    lines = [
        f"Each measured step beside the published figure of the same step on {model}, at the published batch size "
        f"nearest this run's {batch_size}. Speed-up is over fp32 at the same batch size: measured over this run's "
        "fp32 step, published over the source's own fp32. The img/s ratio compares hardware as much as software; "
        "the speed-up ratio compares what each step gains, which carries across hardware better.",
        "",
    ]
    if plan.get("mode") != "cumulative":
        lines += ["The published figures are cumulative (each step on top of the ones before); this run is not.", ""]
    head = (
        "step | img/s | speed-up | published on | published bs | published img/s | published speed-up | "
        "published mIoU | img/s measured/published | speed-up measured/published"
    ).split(" | ")
    rows, used = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], {}
    for r in measured(step_results):
        speedup = r.img_s / base.img_s if base and base.img_s else None
        ours = [r.step, _rate(r.img_s), _num(speedup, ".2f", "x")]
        figures = published.figures(r.step, model, batch_size, device)
        if not figures:
            why = published.unmeasured(r.step)
            rows.append(_row([*ours, "no published figure" + (f": {why}" if why else ""), *["—"] * 6]))
        for f in figures:
            used[f.source] = f
            rows.append(
                _row(
                    [
                        *ours,
                        f.hardware,
                        str(f.batch_size),
                        _rate(f.img_s),
                        _num(f.speedup, ".2f", "x"),
                        _num(f.miou, ".4f"),
                        _num(r.img_s / f.img_s if f.img_s else None, ".2f"),
                        _num(speedup / f.speedup if speedup is not None and f.speedup else None, ".2f"),
                    ]
                )
            )
    sources = published.sources()
    notes = [f"- {f.hardware}: <{f.url}>; {' '.join(sources[s]['detail'].split())}" for s, f in sorted(used.items())]
    return lines + rows + (["", *notes] if notes else [])


def _regression(r: StepResult, prev: StepResult, logs: Path | None) -> list[str]:
    """What the results and the step's log say about a step slower than the one before it."""
    drop = 100 * (1 - r.img_s / prev.img_s)
    lines = [
        f"### `{r.step}`: {_rate(r.img_s)} img/s, {drop:.1f}% below `{prev.step}` ({_rate(prev.img_s)} img/s)",
        "",
        f"- compile s: {_num(r.compile_s, '.1f')} (`{prev.step}`: {_num(prev.compile_s, '.1f')})",
    ]
    if r.encoder_ms is not None or prev.encoder_ms is not None:  # the encoder is what compile compiles
        change = f", {100 * (r.encoder_ms / prev.encoder_ms - 1):+.1f}%" if r.encoder_ms and prev.encoder_ms else ""
        was = f"`{prev.step}`: {_num(prev.encoder_ms, '.2f')}{change}"
        lines.append(f"- encoder ms: {_num(r.encoder_ms, '.2f')} ({was})")
    log = Path(r.filename()).with_suffix(".log").name  # the runner's name for the step's output
    name, path = f"logs/{log}", logs / log if logs is not None else None
    if path is None or not path.is_file():
        return [*lines, f"- no log `{name}` in the results folder"]
    hits = [line.rstrip()[:240] for line in path.read_text(errors="replace").splitlines() if LOG_WORDS.search(line)]
    if not hits:
        return [*lines, f"- `{name}`: no line mentions compile, autotune, recompile, graph break or fallback"]
    return [
        *lines,
        f"- `{name}`, the last {min(len(hits), LOG_TAIL)} of {len(hits)} lines that mention compile, autotune, "
        "recompile, graph break or fallback:",
        "",
        "```text",
        *hits[-LOG_TAIL:],
        "```",
    ]


def _wall_s(r: StepResult) -> float:
    """A step's seconds from started_at to finished_at; 0 where either is missing."""
    try:
        return (datetime.fromisoformat(r.finished_at) - datetime.fromisoformat(r.started_at)).total_seconds()
    except (ValueError, TypeError):  # empty, or one of them without a time zone
        return 0.0


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60} min {s} s" if m >= 60 else f"{m} min {s} s"


def render(step_results: list[StepResult], plan: dict[str, Any], logs: Path | None = None) -> str:
    """The markdown text of the report; `logs` is the results folder's logs/ (quoted under Regressions)."""
    base = baseline(step_results)
    slower = regressions(step_results, plan.get("mode"))
    lines = [f"# samrepro report: {_heading(plan)}", "", *verdict(step_results, base, plan), ""]
    if any(r.weights.startswith("random") for r in step_results):
        lines += [RANDOM_BANNER, ""]
    name = workload_name(plan, step_results)
    batch = "one image at a time" if name in ("amg", "interactive") else f"batch size {plan.get('batch_size')}"
    lines.append(
        f"- model `{plan.get('model')}` on `{plan.get('device')}`, {batch}, "
        f"{plan.get('images')} images, plan hash `{plan.get('plan_hash')}`"
    )
    started = sorted(r.started_at for r in step_results if r.started_at)
    finished = sorted(r.finished_at for r in step_results if r.finished_at)
    if started and finished:
        lines.append(f"- ran from {started[0]} to {finished[-1]}")
    lines += ["", *(f"![{CHARTS[s][2]}]({s}.svg)" for s in CHARTS), "", "## Steps", ""]
    columns = {"amg": AMG_COLUMNS, "interactive": INTERACTIVE_COLUMNS}.get(name, POINTS_COLUMNS)
    lines += [*_table(step_results, base, {r.step for r, _ in slower}, columns), ""]
    lines.append(
        f"Speed-up is over the fp32 step `{base.step}`." if base else "No fp32 step (one without patches) ran."
    )
    if slower:
        lines.append(f"{SLOWER} after img/s: slower than the step before it (see Regressions).")
    lines.append({"amg": AMG_NOTE, "interactive": INTERACTIVE_NOTE}.get(name, POINTS_NOTE))
    changed = [r.step for r in step_results if r.changes_weights]
    if changed:
        lines += [
            "",
            f"> **Note:** {', '.join(f'`{s}`' for s in changed)} change weight values (quantization or sparsity): "
            "part of their accuracy change comes from the weights themselves, and MLPerf's Closed division would "
            "not accept them.",
        ]
    done = {r.step for r in step_results}
    planned = plan["plan"].get("steps", []) if isinstance(plan.get("plan"), dict) else []  # a name without plan.json
    missing = [s["name"] for s in planned if s["name"] not in done]
    if missing:
        lines += [
            "",
            f"> **Not run:** {', '.join(f'`{s}`' for s in missing)} of the plan left no StepResult (the sweep was "
            "stopped or is still running); rerunning the same command into this folder resumes there.",
        ]
    limits = speed_limits(step_results, base)
    if limits:
        lines += ["", "## What limits the speed-ups", "", *map(markdown, limits)]
    lines += ["", "## Published figures", "", *published_comparison(step_results, base, plan)]
    if slower:
        lines += ["", "## Regressions", "", "Steps slower than the measured step before them (cumulative mode)."]
        for r, prev in slower:
            lines += ["", *_regression(r, prev, logs)]
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


def _table(
    step_results: list[StepResult], base: StepResult | None, slower: set[str], columns: tuple[str, ...]
) -> list[str]:
    """One row per step, one cell per column name (CELLS)."""
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in step_results:
        row = Row(r, base, r.step in slower)
        rows.append("| " + " | ".join(_cell(CELLS[c](row)) for c in columns) + " |")
    return rows


@dataclass
class Row:
    """A step and what its cells compare it with."""

    r: StepResult
    base: StepResult | None
    slower: bool

    @property
    def speedup(self) -> float | None:
        base, r = self.base, self.r
        return r.img_s / base.img_s if base and base.img_s and r.img_s is not None else None

    @property
    def encoder_speedup(self) -> float | None:
        base, r = self.base, self.r
        return base.encoder_ms / r.encoder_ms if base and base.encoder_ms and r.encoder_ms else None


CELLS: dict[str, Callable[[Row], str]] = {
    "step": lambda w: w.r.step,
    "patches": lambda w: ", ".join(w.r.patches) or "(none)",
    "status": lambda w: w.r.status,
    "img/s": lambda w: _rate(w.r.img_s) + (f" {SLOWER}" if w.slower else ""),
    "speed-up": lambda w: _num(w.speedup, ".2f", "x"),
    "p50 ms": lambda w: _num(w.r.latency_ms_p50, ".2f"),
    "p90 ms": lambda w: _num(w.r.latency_ms_p90, ".2f"),
    "click p50 ms": lambda w: _num(w.r.click_ms_p50, ".2f"),
    "click p90 ms": lambda w: _num(w.r.click_ms_p90, ".2f"),
    "encoder ms": lambda w: _num(w.r.encoder_ms, ".2f"),
    "encoder speed-up": lambda w: _num(w.encoder_speedup, ".2f", "x"),
    "encoder TFLOP/s": lambda w: _num(w.r.encoder_tflop_s, ".3g"),
    "peak MiB": lambda w: _num(w.r.peak_mem_mib, ".0f"),
    "compile s": lambda w: _num(w.r.compile_s, ".1f"),
    "mIoU GT": lambda w: _num(w.r.miou_gt, ".4f"),
    "agreement mIoU": lambda w: _num(w.r.miou_agreement, ".4f"),
    "masks/image": lambda w: _num(w.r.amg_masks_per_image, ".2f"),
    "matched mIoU": lambda w: _num(w.r.amg_matched_miou, ".4f"),
    "matched ≥ 0.5": lambda w: _num(w.r.amg_match_share, ".3f"),
    "masks/image vs fp32": lambda w: _num(w.r.amg_mask_count_diff, "+.2f"),
    "SQNR dB": lambda w: _num(w.r.embedding_sqnr_db, ".1f"),
    "gate": lambda w: "**FAIL**" if w.r.gate == "fail" else w.r.gate,
    "tolerance": lambda w: ", ".join(f"{k}={v:.4g}" for k, v in sorted(w.r.tolerance.items())),
    "violations": lambda w: "; ".join(w.r.gate_violations),
    "kernel paths": lambda w: ", ".join(f"{k}={v}" for k, v in sorted(w.r.kernel_paths.items())),
    "reason": lambda w: w.r.reason or "",
}
_SPEED = ("step", "patches", "status", "img/s", "speed-up", "p50 ms", "p90 ms")
_GATE = ("SQNR dB", "gate", "tolerance", "violations", "kernel paths", "reason")
POINTS_COLUMNS = (
    *_SPEED, "encoder ms", "encoder speed-up", "encoder TFLOP/s", "peak MiB", "compile s", "mIoU GT",
    "agreement mIoU", *_GATE,
)  # fmt: skip
AMG_COLUMNS = (
    *_SPEED,
    "peak MiB",
    "compile s",
    "masks/image",
    "matched mIoU",
    "matched ≥ 0.5",
    "masks/image vs fp32",
    *_GATE,
)
INTERACTIVE_COLUMNS = (
    *_SPEED, "click p50 ms", "click p90 ms", "encoder ms", "encoder speed-up", "encoder TFLOP/s", "peak MiB",
    "compile s", "mIoU GT", "agreement mIoU", *_GATE,
)  # fmt: skip
INTERACTIVE_SIZE = "interactive: one image at a time, each prompt decoded alone"
INTERACTIVE_NOTE = (
    "Interactive: p50/p90 ms is the time from a new image to its first mask (its encoder call and its first click), "
    "click ms one prompt alone through prompt encoder, mask decoder and upsampling, img/s the whole loop (every "
    "image embedded and every prompt clicked, one after the other). mIoU GT, agreement mIoU and SQNR are measured "
    "as in the points workload."
)
POINTS_NOTE = (
    "Latency is per image; mIoU GT is mIoU with center-point prompts against ground truth; agreement mIoU and "
    "SQNR compare with the fp32 model's masks and image embeddings."
)
AMG_NOTE = (
    "Automatic mask generation: latency is one `generate` call per image. Each fp32 mask is matched to this "
    "step's mask of highest IoU on the same image: matched mIoU is the mean of those IoUs, matched ≥ 0.5 the share "
    "of fp32 masks whose match reaches 0.5, masks/image vs fp32 the masks gained (+) or lost (-) per image. SQNR "
    "compares the first image's embedding. There is no mIoU against ground truth: the generator's masks answer "
    "no prompt, so nothing pairs a mask with a ground-truth object, and none is computed."
)


def workload_name(plan: dict[str, Any], step_results: list[StepResult]) -> str:
    """The workload the run timed (plan.json says; older folders have only their StepResults)."""
    workload = plan.get("workload")
    if isinstance(workload, dict):
        return workload.get("name", "points")
    return next((r.workload.get("name", "points") for r in step_results), "points")


def is_amg(plan: dict[str, Any], step_results: list[StepResult]) -> bool:
    return workload_name(plan, step_results) == "amg"


def _size(plan: dict[str, Any], step_results: list[StepResult]) -> str:
    """The workload's size for the verdict: the batch size, the clicks, or the generator's grid and filters."""
    if workload_name(plan, step_results) == "interactive":
        return INTERACTIVE_SIZE
    if not is_amg(plan, step_results):
        return f"batch size {plan.get('batch_size')}"
    w = plan.get("workload") or next(r.workload for r in step_results if r.is_amg)
    return (
        f"automatic mask generation (official SamAutomaticMaskGenerator): {w['points_per_side']}² points per image, "
        f"{w['points_per_batch']} per batch, {w['crop_n_layers']} crop layer(s), pred_iou_thresh "
        f"{w['pred_iou_thresh']:g}, stability_score_thresh {w['stability_score_thresh']:g}"
    )


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


def _rate(img_s: float | None) -> str:
    return _num(img_s, ".1f" if (img_s or 0) >= 10 else ".3g")  # CPU vit rates are ~0.05 img/s


def _num(v: float | None, fmt: str, suffix: str = "") -> str:
    if v is None:
        return "—"
    return str(v) if not math.isfinite(v) else f"{v:{fmt}}{suffix}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


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
