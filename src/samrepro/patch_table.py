"""The registered patches as a table: plain text for the terminal (with availability here) or Markdown for the
README (the same on every machine)."""

from __future__ import annotations

import math

from samrepro.patch import Patch, Requires, Tolerance
from samrepro.registry import get_patch, list_patches

MARKDOWN_HEADER = ("patch", "what", "agreement ≥ / SQNR ≥", "devices", "weights", "AMG")


def text(device: str) -> str:
    """Aligned columns: every bound of each tolerance, and whether the patch can run on `device` (and why not)."""
    rows = [("name", "devices", "changes weights", "tolerance", f"available ({device})", "summary")]
    for p in _patches():
        reason = p.unavailable_reason(device)
        rows.append(
            (p.name, ",".join(p.requires.devices), "yes" if p.changes_weights else "no", _all_bounds(p.tolerance),
             "yes" if reason is None else f"no: {reason}", p.summary)
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def markdown() -> str:
    """README's table: name, summary, agreement and SQNR bounds, devices (with any minimum GPU), weights kept or not,
    and whether the patch serves `--workload amg` (the reasons of those that do not: `samrepro patches`)."""
    lines = ["| " + " | ".join(MARKDOWN_HEADER) + " |", "|" + "---|" * len(MARKDOWN_HEADER)]
    for p in _patches():
        cells = (f"`{p.name}`", p.summary.replace("|", "\\|"), _agreement_sqnr(p.tolerance), _devices(p.requires),
                 "changed" if p.changes_weights else "kept", "no" if p.workload_reason("amg") else "yes")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _patches() -> list[Patch]:
    return [get_patch(name) for name in list_patches()]


def _all_bounds(tol: Tolerance) -> str:
    sqnr = "exact" if math.isinf(tol.embedding_sqnr_min_db) else f">={tol.embedding_sqnr_min_db:g}dB"
    return (
        f"agree>={tol.agreement_miou_min:g} gt-drop<={tol.gt_miou_drop_max:g} "
        f"sqnr {sqnr} iou-pred<={tol.iou_pred_max_abs:g} "
        f"amg-matched>={tol.amg_matched_miou_min:.4g} amg-share>={tol.amg_match_share_min:.4g}"
    )


def _agreement_sqnr(tol: Tolerance) -> str:
    """'exact' when both are exact, else 'AGREEMENT / SQNR' with either part 'exact'."""
    sqnr = "exact" if math.isinf(tol.embedding_sqnr_min_db) else f"{tol.embedding_sqnr_min_db:g} dB"
    if tol.agreement_miou_min == 1.0 and sqnr == "exact":
        return "exact"
    return f"{tol.agreement_miou_min:g} / {sqnr}"


def _devices(requires: Requires) -> str:
    """'cpu, cuda', with the minimum compute capability on cuda where one is declared ('cuda sm89+')."""
    cap = "" if requires.min_capability is None else " sm{}{}+".format(*requires.min_capability)
    return ", ".join(d + cap if d == "cuda" else d for d in requires.devices)
