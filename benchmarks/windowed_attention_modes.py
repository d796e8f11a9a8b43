"""The windowed-attention kernel at vit_h's (or vit_b's) shape in its two modes, alone: on padded windows cut out as
upstream's `window_partition` does (`rel_pos_attention_tables`), and on the image's own tokens, each window read in
place (`rel_pos_attention_windows`). Prints each mode's median kernel time (CUDA events over --iters launches).

It is also the target for a kernel profiler, one launch per mode after warm-up:
    ncu --clock-control none -k regex:_rel_pos_attention_fwd --launch-skip 3 --launch-count 1 \
        python3 benchmarks/windowed_attention_modes.py --iters 1 --warmup 3 --mode image
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import samrepro.kernels.rel_pos_attention  # noqa: F401  (registers the samrepro:: ops)

SHAPES = {"vit_b": (12, 64), "vit_h": (16, 80)}  # heads, head dim
WINDOW, GRID = 14, 64  # tokens per window side and per image side at 1024 px


def partitioned(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B * 25, heads, 196, d) of qkv (B, 64, 64, 3C) zero-padded to 70² and cut into 14² windows."""
    b, _, _, c3 = qkv.shape
    n = -(-GRID // WINDOW)  # windows per side
    padded = F.pad(qkv, (0, 0, 0, n * WINDOW - GRID, 0, n * WINDOW - GRID))  # B, 70, 70, 3C
    wins = padded.view(b, n, WINDOW, n, WINDOW, c3).permute(0, 1, 3, 2, 4, 5).reshape(b * n * n, WINDOW**2, c3)
    return wins.view(b * n * n, WINDOW**2, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each B*25, heads, 196, d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=SHAPES, default="vit_h")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mode", choices=("both", "partitioned", "image"), default="both")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    heads, d = SHAPES[args.model]
    gen = torch.Generator("cuda").manual_seed(0)
    qkv = torch.randn(args.batch, GRID, GRID, 3 * heads * d, device="cuda", generator=gen, dtype=torch.bfloat16)
    bias = torch.randn(3 * heads * d, device="cuda", generator=gen, dtype=torch.bfloat16)
    table_h, table_w = (torch.randn(2 * WINDOW - 1, d, device="cuda", generator=gen) / d**0.5 for _ in range(2))
    ops, scale = torch.ops.samrepro, d**-0.5
    q, k, v = partitioned(qkv, heads)
    calls = {
        "partitioned": lambda: ops.rel_pos_attention_tables(q, k, v, table_h, table_w, scale),
        "image": lambda: ops.rel_pos_attention_windows(qkv, bias, table_h, table_w, heads, scale),
    }
    for mode in ("partitioned", "image") if args.mode == "both" else (args.mode,):
        for _ in range(args.warmup):
            calls[mode]()
        times = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[mode]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # µs
        print(f"{args.model} batch {args.batch} {mode}: median {statistics.median(times):.1f} µs over {args.iters}")


if __name__ == "__main__":
    main()
