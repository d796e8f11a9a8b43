"""A sweep's summary across its matrix: sweep.json (settings and one row per ablation), summary.md (the table) and
throughput.{png,svg} (the best gated throughput by batch size, one line per model, device, plan and mode)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from samrepro import results
from samrepro.ablation import Ablation
from samrepro.results import StepResult

SUMMARY, CHART = "summary.md", "throughput"
COLUMNS = ("model", "device", "plan", "mode", "batch", "fp32 img/s", "best gated step", "img/s", "vs fp32",
           "peak MiB", "steps ok/skipped/failed", "gate fails", "report")  # fmt: skip


def row(ab: Ablation, step_results: list[StepResult]) -> dict[str, Any]:
    """One ablation: its fp32 and its fastest step that passed its gate (the fp32 step where none did)."""
    base = results.baseline(step_results)
    passed = [r for r in step_results if r.status == "ok" and r.gate == "pass" and _finite(r.img_s)]
    best = max(passed, key=lambda r: r.img_s, default=base)
    status = Counter(r.status for r in step_results)
    return {
        "folder": ab.folder.name,
        "plan": ab.plan.name,
        **{k: ab.setup[k] for k in ("model", "device", "mode", "batch_size")},
        "fp32_img_s": base.img_s if base else None,
        "best_step": best.step if best else None,
        "best_img_s": best.img_s if best else None,
        "best_peak_mem_mib": best.peak_mem_mib if best else None,
        "steps": {s: status[s] for s in results.STATUSES},
        "gate_fails": [r.step for r in step_results if r.gate == "fail"],
        "failed": [r.step for r in step_results if r.status == "failed"],
    }


def write(root: Path, info: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """sweep.json, the chart and summary.md in `root`; returns summary.md's path."""
    results.write_json(root / "sweep.json", info | {"ablations": rows})
    _chart(rows, root / CHART)
    path = root / SUMMARY
    path.write_text(render(info, rows))
    return path


def render(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    sweep = info["sweep"]
    lines = [
        f"# Sweep {sweep['name']}",
        "",
        f"{len(rows)} ablation(s) of {sweep['images']} image(s) each, data {sweep['data']}, "
        f"weights {sweep['weights'] or 'default'}; from `{info['command']}`, {info['started_at']} to "
        f"{info.get('finished_at')}.",
        "",
        "Best gated step: the fastest step whose gate passed (the fp32 step where none did). Each ablation's own "
        "report has every step.",
        "",
        f"![best gated throughput by batch size]({CHART}.png)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        speedup = r["best_img_s"] / r["fp32_img_s"] if r["best_img_s"] and r["fp32_img_s"] else None
        steps = r["steps"]
        cells = [
            r["model"],
            r["device"],
            r["plan"],
            r["mode"],
            str(r["batch_size"]),
            _num(r["fp32_img_s"], ".3g"),
            r["best_step"] or "—",
            _num(r["best_img_s"], ".3g"),
            _num(speedup, ".2f", "x"),
            _num(r["best_peak_mem_mib"], ",.0f"),
            f"{steps['ok']}/{steps['skipped']}/{steps['failed']}",
            ", ".join(r["gate_fails"]) or "none",
            f"[report]({r['folder']}/report/report.md)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chart(rows: list[dict[str, Any]], stem: Path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple[int, float]]] = {}
    fp32: dict[str, dict[int, float]] = {}
    for r in rows:
        if _finite(r["best_img_s"]):
            lines.setdefault(f"{r['model']} {r['device']} {r['plan']} {r['mode']}", []).append(
                (r["batch_size"], r["best_img_s"])
            )
        if _finite(r["fp32_img_s"]):  # the same measurement in every plan's ablation: drawn once
            fp32.setdefault(f"{r['model']} {r['device']} fp32", {}).setdefault(r["batch_size"], r["fp32_img_s"])
    with matplotlib.rc_context({"svg.hashsalt": "samrepro", "svg.fonttype": "path"}):
        fig = Figure(figsize=(7.5, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        for label, points in fp32.items():
            xs, ys = zip(*sorted(points.items()))
            ax.plot(xs, ys, linestyle="--", color="#8c8c8c", marker=".", label=label)
        values = [y for p in lines.values() for _, y in p] + [y for p in fp32.values() for y in p.values()]
        if values and max(values) > 50 * min(values):  # vit_h next to tiny: orders of magnitude apart
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s (best gated step)")
        ax.set_title("Best gated throughput by batch size", fontsize=10)
        if lines or fp32:
            ax.legend(fontsize=7)
        fig.savefig(stem.with_suffix(".png"), dpi=120)
        fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "—" if not _finite(value) else f"{value:{fmt}}{suffix}"
