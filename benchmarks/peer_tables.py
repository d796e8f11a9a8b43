"""The side-by-side tables printed at the end of a run (markdown), one per workload."""

from __future__ import annotations

LATENCY_KEYS = [f"{part}_p{q}_ms" for part in ("encoder", "click", "first_mask") for q in (50, 90)]


def num(value, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(head: list[str], records: list[dict], cells) -> str:
    """One row per contender: its name, `cells(record)`, then its status with the reason."""
    lines = ["| contender | " + " | ".join(head) + " | status |", "|---" * (len(head) + 2) + "|"]
    for r in records:
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(f"| {r['contender']} | " + " | ".join(cells(r)) + f" | {status} |")
    return "\n".join(lines)


def table(records: list[dict]) -> str:
    def cells(r):
        img_s = r.get("img_s")
        return [num(img_s), num(img_s and 1e3 / img_s, ".1f"), num(r.get("warmup_s"), ".1f"),
                num(r.get("peak_mem_mib"), ",.0f"), num(r.get("miou_agreement"), ".4f")]  # fmt: skip

    return markdown(["img/s", "ms/img", "warm-up s", "peak MiB", "agreement mIoU"], records, cells)


def amg_table(records: list[dict]) -> str:
    def cells(r):
        out = [num(r.get(k)) for k in ("img_s", "latency_p50_ms", "latency_p90_ms", "masks_per_image")]
        out += [num(r.get("amg_matched_miou"), ".4f"), num(r.get("amg_match_share"), ".3f")]
        return out + [num(r.get("warmup_s"), ".1f"), num(r.get("peak_mem_mib"), ",.0f")]

    head = ["img/s", "p50 ms/img", "p90", "masks/img", "matched mIoU", "matched ≥ 0.5", "warm-up s", "peak MiB"]
    return markdown(head, records, cells)


def latency_table(records: list[dict]) -> str:
    def cells(r):
        return [num(r.get(k)) for k in LATENCY_KEYS] + [num(r.get("miou_agreement"), ".4f")]

    head = ["encoder p50 ms", "p90", "click p50 ms", "p90", "first mask p50 ms", "p90", "agreement"]
    return markdown(head, records, cells)
