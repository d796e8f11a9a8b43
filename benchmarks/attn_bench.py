"""Microbenchmark of SAM's encoder attention with the decomposed rel-pos bias: speed and error of each implementation.

For vit_b (12 heads, dim 64) and vit_h (16 heads, dim 80), 14x14 windows (batch * 25 of them at 1024 px) and the
64x64 global grid, in bf16, from the same q, k, v and position tables (2 * 14|64 - 1, dim). The rel terms rel_h,
rel_w (B, heads, N, 14|64), computed from q and the tables, are common to all but the tables kernel and not timed.
Error: max |out - ref| against an fp32 softmax with the materialized bias computed from the same bf16 inputs (TF32
off). Time: median of --iters calls after --warmup, CUDA events on GPU.

python benchmarks/attn_bench.py --out attn.json                            # GPU (estimated ~3 min on an H100)
python benchmarks/attn_bench.py --device cpu --quick --out /tmp/attn.json  # CPU smoke test, ~1 min
q, k, v are N(0, 1), the tables N(0, 1 / dim); rows that cannot run here say why (skipped), configs that fail to
compile or fit say how (error).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time
from functools import partial
from itertools import product
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from samrepro.models import fp32_reference_mode
from samrepro.patches._relpos import rel_pos_terms
from samrepro.patches.flex_attn import rel_pos_score_mod

MODELS = {"vit_b": (12, 64), "vit_h": (16, 80)}  # heads, head dim
QUICK_MODELS = {"vit_b": (2, 64), "vit_h": (2, 80)}
GRIDS = {"window": 14, "global": 64}  # tokens per side; 25 windows per image at 1024 px
QUICK_GRIDS = {"window": 6, "global": 12}
DTYPE = torch.bfloat16
# the kernel's launch sweep, BLOCK_M x BLOCK_N x warps x stages per grid kind, each run with both bias modes
SWEEP = {
    "window": "64x32x4x2,128x32x4x2,64x64x4x2,128x64x8x2,64x256x4x1,64x256x8x1,128x256x8x1,32x32x2x2,64x32x4x3",
    "global": "64x64x4x3,128x64x8x3,128x64x4x3,128x128x8x3,64x64x4x4,128x32x4x3",
}
BIAS_MODES = ("gather", "onehot")  # samrepro.kernels.rel_pos_attention.BIAS_MODES, without importing Triton here


class Skip(Exception):
    """A method that cannot run here; the message is the reason."""


def upstream(q, k, v, rel_h, rel_w, scale):
    """segment_anything's math: scores in the input dtype, the bias broadcast over the key grid, softmax, @ v."""
    B, heads, n, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)  # B, heads, N, N
    attn = attn.view(B, heads, n, rel_h.shape[-1], rel_w.shape[-1]) + rel_h[..., :, None] + rel_w[..., None, :]
    return attn.view(B, heads, n, n).softmax(dim=-1) @ v


def materialized_bias(rel_h, rel_w):
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # B, heads, N, kh * kw


def reference(q, k, v, rel_h, rel_w, scale, budget=2**30):
    """fp32 softmax with the materialized bias, in chunks of the batch so a (chunk, heads, N, N) map fits `budget`."""
    B, heads, n, _ = q.shape
    step = max(1, budget // (heads * n * n * 4))
    outs = []
    for i in range(0, B, step):
        qc, kc, vc, hc, wc = (t[i : i + step].float() for t in (q, k, v, rel_h, rel_w))
        attn = torch.softmax(qc @ kc.transpose(-2, -1) * scale + materialized_bias(hc, wc), dim=-1)  # c, heads, N, N
        outs.append(attn @ vc)
    return torch.cat(outs)


def sdpa_bias(backend):
    def run(q, k, v, rel_h, rel_w, scale):
        bias = materialized_bias(rel_h, rel_w)  # built every call, as the sdpa patch does
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    return run


def skip_unfit(q: torch.Tensor, width: int, split: bool, grid: int | None) -> None:
    """Skip a kernel config meant for another key grid (`width` keys per row), or a split run of a power-of-two
    head dim (it would equal the padded run)."""
    if grid is not None and width != grid:
        raise Skip(f"a config for the {grid}-wide grid")
    d = q.shape[-1]
    if split and d & (d - 1) == 0:
        raise Skip(f"head dim {d} is a power of two: split == padded")


def triton(blocks=(0, 0, 0, 0), split=False, bias="", grid=None):
    """The kernel with these launch parameters (0: the table's); `grid` limits it to one key grid (window 14 |
    global 64), and a split head dim runs only where it is not a power of two (elsewhere it equals the padded run)."""
    import samrepro.kernels.rel_pos_attention  # noqa: F401  (registers the op; imports Triton)

    def run(q, k, v, rel_h, rel_w, scale):
        skip_unfit(q, rel_w.shape[-1], split, grid)
        return torch.ops.samrepro.rel_pos_attention(q, k, v, rel_h, rel_w, scale, *blocks, split, bias)

    return run


def triton_tables(blocks=(0, 0, 0, 0), split=False, grid=None):
    """The kernel computing the rel terms itself from the position tables (`rel_pos_attention_tables`)."""
    import samrepro.kernels.rel_pos_attention  # noqa: F401  (registers the op; imports Triton)

    def run(q, k, v, table_h, table_w, scale):
        skip_unfit(q, (len(table_w) + 1) // 2, split, grid)
        return torch.ops.samrepro.rel_pos_attention_tables(q, k, v, table_h, table_w, scale, *blocks, split)

    run.takes_tables = True
    return run


def flex(mode):
    compiled = torch.compile(flex_attention, mode=mode, fullgraph=True, dynamic=False)

    def run(q, k, v, rel_h, rel_w, scale):
        rel = torch.cat([rel_h, rel_w], dim=-1)  # B, heads, N, kh + kw: what the flex_attn patch captures
        score_mod = rel_pos_score_mod(rel, rel_h.shape[-1], rel_w.shape[-1])
        return compiled(q, k, v, score_mod=score_mod, scale=scale)

    return run


def fold(backend, pad_v=False):
    """The bias folded into the head dim: q' = [q * scale, rel_h, rel_w, 0], k' = [k, onehot(row), onehot(col), 0],
    so q'.k' = scale q.k + rel_h[row] + rel_w[col]; then mask-free SDPA at scale 1 (flash also needs v padded)."""

    onehots = {}  # per key grid: a patch would keep it as a buffer

    def run(q, k, v, rel_h, rel_w, scale):
        B, heads, n, d = q.shape
        kh, kw = rel_h.shape[-1], rel_w.shape[-1]
        pad = -(d + kh + kw) % 8  # head dim to a multiple of 8
        if (kh, kw) not in onehots:
            key = torch.arange(n, device=q.device)
            onehots[kh, kw] = torch.cat([F.one_hot(key // kw, kh), F.one_hot(key % kw, kw)], -1).to(q.dtype)  # N, kh+kw
        onehot = onehots[kh, kw]
        q2 = F.pad(torch.cat([q * scale, rel_h, rel_w], dim=-1), (0, pad))  # B, heads, N, d'
        k2 = F.pad(torch.cat([k, onehot.expand(B, heads, n, -1)], dim=-1), (0, pad))  # B, heads, N, d'
        v2 = F.pad(v, (0, q2.shape[-1] - d)) if pad_v else v
        if backend is None:
            out = F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)
        return out[..., :d]

    return run


def methods(device: str, flex_autotune: bool, sweep: dict, grids: dict) -> dict:
    """name -> a function to build the method (raising Skip with the reason when it cannot run here)."""

    def cuda_only(build, why):
        def make():
            if device != "cuda":
                raise Skip(why)
            return build()

        return make

    pin = "pinning an SDPA backend is CUDA-only"
    out = {
        "upstream": lambda: upstream,
        "sdpa+bias": lambda: sdpa_bias(None),
        "sdpa+bias[efficient]": cuda_only(lambda: sdpa_bias(SDPBackend.EFFICIENT_ATTENTION), pin),
        "sdpa+bias[cudnn]": cuda_only(lambda: sdpa_bias(SDPBackend.CUDNN_ATTENTION), pin),
    }
    cuda = "samrepro::rel_pos_attention runs on CUDA only"
    out["triton[table]"] = cuda_only(triton, cuda)
    # the head dim split into a power of two and a tail (vit_h: 64 + 16) instead of padded; its own table
    out["triton-split[table]"] = cuda_only(lambda: triton(split=True), cuda)
    out["triton-tables[table]"] = cuda_only(triton_tables, cuda)
    out["triton-tables-split[table]"] = cuda_only(lambda: triton_tables(split=True), cuda)
    for kind, configs in sweep.items():
        for cfg, bias, split in product(configs.split(",") if configs else [], BIAS_MODES, (False, True)):
            blocks = tuple(int(x) for x in cfg.split("x"))
            name = f"triton{'-split' if split else ''}[{kind} {cfg} {bias}]"
            out[name] = cuda_only(lambda b=blocks, s=split, m=bias, g=grids[kind]: triton(b, s, m, g), cuda)
        for cfg, split in product(configs.split(",") if configs else [], (False, True)):
            blocks = tuple(int(x) for x in cfg.split("x"))
            name = f"triton-tables{'-split' if split else ''}[{kind} {cfg}]"
            out[name] = cuda_only(lambda b=blocks, s=split, g=grids[kind]: triton_tables(b, s, g), cuda)
    out["flex"] = lambda: flex("default")
    if flex_autotune:
        out["flex[max-autotune]"] = lambda: flex("max-autotune-no-cudagraphs")
    out["fold"] = lambda: fold(None)
    out["fold[cudnn]"] = cuda_only(lambda: fold(SDPBackend.CUDNN_ATTENTION), pin)
    out["fold[efficient]"] = cuda_only(lambda: fold(SDPBackend.EFFICIENT_ATTENTION), pin)
    out["fold[flash,v padded]"] = cuda_only(lambda: fold(SDPBackend.FLASH_ATTENTION, pad_v=True), pin)
    return out


def time_ms(fn, device: str, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_mib(fn, device: str) -> float | None:
    """Memory one call allocates above what was held before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_case(case: dict, makers: dict, args) -> list[dict]:
    heads, d, grid, batch = case["heads"], case["head_dim"], case["grid"], case["tokens_batch"]
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = (batch, heads, grid * grid)
    q, k, v = (torch.randn(*shape, d, generator=gen, device=args.device).to(DTYPE) for _ in range(3))
    scale = d**-0.5
    tables = [(torch.randn(2 * grid - 1, d, generator=gen, device=args.device) * scale).to(DTYPE) for _ in range(2)]
    terms = rel_pos_terms(q, *tables, (grid, grid), (grid, grid))  # B, heads, grid, grid, grid (each)
    rel_h, rel_w = (t.reshape(*shape, grid) for t in terms)
    ref = reference(q, k, v, rel_h, rel_w, scale)
    torch._dynamo.reset()  # each case compiles its own flex graphs; keeps clear of the recompile limit
    rows = []
    for name, make in makers.items():
        row = {**case, "method": name}
        try:
            fn = make()
            call = partial(fn, q, k, v, *(tables if getattr(fn, "takes_tables", False) else (rel_h, rel_w)), scale)
            out = call()  # first call: compiles, and is checked
            row["max_abs_err"] = (out.float() - ref).abs().max().item()
            del out
            times = time_ms(call, args.device, args.warmup, args.iters)
            row |= {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}
            row["peak_mib"] = peak_mib(call, args.device)
        except Skip as e:
            row["skipped"] = str(e)
        except Exception as e:  # a config that does not compile or fit is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    case = f"{row['model']} {row['kind']} bs{row['batch']} ({row['tokens_batch']}x{row['heads']}x{row['grid'] ** 2})"
    if "ms" in row:
        mem = "" if row["peak_mib"] is None else f"{row['peak_mib']:9.1f} MiB"
        return f"{case:34} {row['method']:22} {row['ms']:9.3f} ms  err {row['max_abs_err']:.2e} {mem}"
    return f"{case:34} {row['method']:22} {'skipped: ' + row['skipped'] if 'skipped' in row else row['error']}"


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        import triton

        env |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "triton": triton.__version__}
        env |= {"cudnn": torch.backends.cudnn.version(), "tf32": torch.backends.cuda.matmul.allow_tf32}
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="images (windows: 25 each)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", default="*", help="names or shell patterns, e.g. 'flex*,fold[cudnn]'")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=25)
    for kind, configs in SWEEP.items():
        parser.add_argument(f"--{kind}-configs", default=configs, help="the kernel's sweep: BMxBNxWARPSxSTAGES,...")
    parser.add_argument("--flex-autotune", action="store_true", help="also flex with max-autotune (slow compile)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, batch 1, 1 warm-up, 3 calls (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.warmup, args.iters = [1], 1, 3
    models, grids = (QUICK_MODELS, QUICK_GRIDS) if args.quick else (MODELS, GRIDS)
    windows = 4 if args.quick else 25  # windows per image
    fp32_reference_mode()
    start = time.perf_counter()
    patterns = args.methods.split(",")
    sweep = {kind: getattr(args, f"{kind}_configs") for kind in SWEEP}
    makers = {
        n: m
        for n, m in methods(args.device, args.flex_autotune, sweep, grids).items()
        if any(n == p or fnmatch.fnmatch(n, p) for p in patterns)  # exact names too: '[cudnn]' is a pattern class
    }
    # inductor's CPU flex kernel bakes the thread count in, and its disk cache does not key on it: pin it
    with inductor_config.patch({"cpp.threads": torch.get_num_threads()}):
        rows = []
        for model in args.models:
            heads, head_dim = models[model]
            for kind, grid in grids.items():
                for bs in args.batch_sizes:
                    tokens_batch = bs * windows if kind == "window" else bs
                    case = {"model": model, "kind": kind, "batch": bs, "tokens_batch": tokens_batch}
                    case |= {"heads": heads, "head_dim": head_dim, "grid": grid}
                    rows += bench_case(case, makers, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(args.device) | {"dtype": str(DTYPE), "wall_s": round(time.perf_counter() - start, 1)}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"environment": env, "args": config, "rows": rows}, indent=1))
    print(f"wrote {args.out} ({env['wall_s']} s)")


if __name__ == "__main__":
    main()
