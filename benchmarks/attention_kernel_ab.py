"""samrepro's attention kernel alone at vit_h's (or vit_b's) shapes, batch 16 at 1024 px, for A/B runs: the windowed
attention on padded windows cut out as upstream's `window_partition` does (`partitioned`: the tables op), on the
image's own tokens with each window read in place (`image`: the windows op), and the global attention (`global`:
rel terms given, as the global blocks run it), each with vit_h's head dim 80 split into 64 + 16 as triton_attn runs
it by default. Prints each case's time per launch: --iters launches queued back to back between two CUDA events (so
the host's dispatch time hides behind the GPU's work), median of --repeats.

--maxnreg N caps every launch's registers per thread at N (0: as the kernel module sets it), to try occupancy.
It is also the target for a kernel profiler, one launch per case after warm-up:
    ncu --clock-control none -k regex:_rel_pos_attention_fwd --launch-skip 3 --launch-count 1 \
        python3 benchmarks/attention_kernel_ab.py --iters 1 --repeats 1 --warmup 3 --cases image
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from samrepro.kernels import rel_pos_attention as rpa
from samrepro.patches._relpos import rel_pos_terms
from samrepro.patches.triton_attn import splits_head

SHAPES = {"vit_b": (12, 64), "vit_h": (16, 80)}  # heads, head dim
WINDOW, GRID = 14, 64  # tokens per window side and per image side at 1024 px
CASES = ("partitioned", "image", "global")


def partitioned(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B * 25, heads, 196, d) of qkv (B, 64, 64, 3C) zero-padded to 70² and cut into 14² windows."""
    b, _, _, c3 = qkv.shape
    n = -(-GRID // WINDOW)  # windows per side
    padded = F.pad(qkv, (0, 0, 0, n * WINDOW - GRID, 0, n * WINDOW - GRID))  # B, 70, 70, 3C
    wins = padded.view(b, n, WINDOW, n, WINDOW, c3).permute(0, 1, 3, 2, 4, 5).reshape(b * n * n, WINDOW**2, c3)
    return wins.view(b * n * n, WINDOW**2, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each B*25, heads, 196, d


def cap_registers(maxnreg: int) -> None:
    """Every later launch of the kernel with registers capped at maxnreg (Triton's `maxnreg` launch option)."""
    kernel = rpa._rel_pos_attention_fwd

    class Capped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: kernel[grid](*args, **{**kwargs, "maxnreg": maxnreg})

    rpa._rel_pos_attention_fwd = Capped()


def calls(model: str, batch: int) -> dict:
    heads, d = SHAPES[model]
    gen = torch.Generator("cuda").manual_seed(0)
    qkv = torch.randn(batch, GRID, GRID, 3 * heads * d, device="cuda", generator=gen, dtype=torch.bfloat16)
    bias = torch.randn(3 * heads * d, device="cuda", generator=gen, dtype=torch.bfloat16)
    window_h, window_w, grid_h, grid_w = (
        torch.randn(2 * n - 1, d, device="cuda", generator=gen) / d**0.5 for n in (WINDOW, WINDOW, GRID, GRID)
    )
    q, k, v = partitioned(qkv, heads)
    gq, gk, gv = qkv.view(batch, GRID * GRID, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # B, heads, 4096, d
    rel_h, rel_w = (
        t.reshape(batch, heads, GRID * GRID, GRID)  # B, heads, 64, 64, 64 -> B, heads, 4096, 64
        for t in rel_pos_terms(gq, grid_h.bfloat16(), grid_w.bfloat16(), (GRID, GRID), (GRID, GRID))
    )
    ops, scale = torch.ops.samrepro, d**-0.5
    split = splits_head(d)  # as triton_attn's defaults: vit_h's head dim 80 runs as 64 + 16, not padded to 128
    return {
        "partitioned": lambda: ops.rel_pos_attention_tables(q, k, v, window_h, window_w, scale, split_head=split),
        "image": lambda: ops.rel_pos_attention_windows(qkv, bias, window_h, window_w, heads, scale, split_head=split),
        "global": lambda: ops.rel_pos_attention(gq, gk, gv, rel_h, rel_w, scale, split_head=split),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=SHAPES, default="vit_h")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--maxnreg", type=int, default=0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.maxnreg:
        cap_registers(args.maxnreg)
    launches = calls(args.model, args.batch)
    for case in args.cases:
        for _ in range(args.warmup):
            launches[case]()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                launches[case]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / args.iters)  # µs per launch
        cap = args.maxnreg or "module's"
        print(f"{args.model} batch {args.batch} {case} (maxnreg {cap}): median {statistics.median(times):.1f} µs")


if __name__ == "__main__":
    main()
