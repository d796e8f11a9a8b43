"""Where a profiled step's GPU time goes: the kernels of a `--profile` trace summed by kind, and the largest ones.

    python benchmarks/trace_breakdown.py RESULTS/traces/step_01_NAME.trace.json.gz [--top 12]

Reads the Chrome trace that `samrepro ablate ... --profile` writes (one batch of the step) and prints two markdown
tables: GPU time per kind of kernel (GEMM, attention, quantization, ...) with its share, and the largest kernels by
name and launch grid (a kernel launched with two grids is usually two layers' shapes, e.g. windowed and global
attention). Kinds are matched on the kernel's name, first rule first (KINDS).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

KINDS = (  # (kind, pattern on the kernel name): the first that matches names the kind
    ("fp8 activation quantization", r"^_fp8_rows"),
    ("LayerNorm, residual add, layout (fused)", r"layer_norm"),
    ("attention", r"rel_pos_attention_fwd|flash|fmha|sdpa|attention"),
    ("convolution", r"fprop|dgrad|wgrad|convolution|nhwc"),
    ("GEMM fp8", r"^nvjet\w*qq|scaled_mm|f8f6f4|e4m3"),
    ("GEMM", r"^nvjet|gemm|cutlass|^sm\d+_xmma"),
    ("GELU", r"gelu"),
)


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def kernels(trace: Path) -> list[dict]:
    """The trace's GPU kernel events (name, dur in µs, grid)."""
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel"]


def breakdown(events: list[dict], top: int) -> str:
    total = sum(e["dur"] for e in events)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        for table, key in ((by_kind, kind(e["name"])), (by_kernel, (e["name"], str(e.get("args", {}).get("grid"))))):
            table[key][0] += e["dur"]
            table[key][1] += 1
    lines = [f"GPU kernel time of the profiled batch: {total / 1e3:.1f} ms, {len(events)} kernels", ""]
    lines += ["| kind | ms | share | kernels |", "|---|---|---|---|"]
    for k, (us, n) in sorted(by_kind.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {k} | {us / 1e3:.1f} | {us / total:.1%} | {n} |")
    lines += ["", "| kernel | grid | ms | share | launches | µs each |", "|---|---|---|---|---|---|"]
    for (name, grid), (us, n) in sorted(by_kernel.items(), key=lambda item: -item[1][0])[:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {grid} | {us / 1e3:.2f} | {us / total:.1%} | {n} | {us / n:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", type=Path, help="a step's .trace.json.gz from `samrepro ablate ... --profile`")
    p.add_argument("--top", type=int, default=12, help="how many of the largest kernels to list")
    args = p.parse_args(argv)
    events = kernels(args.trace)
    if not events:
        raise SystemExit(f"{args.trace}: no GPU kernel events (a CPU trace, or the profile recorded no device)")
    print(breakdown(events, args.top))


if __name__ == "__main__":
    main()
