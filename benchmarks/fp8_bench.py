"""Microbenchmark of row-wise float8 activation quantization and of the float8 MLP at SAM's encoder shapes.

Rows: M = batch * 4900 tokens (a 1024 px image's 25 padded 14x14 windows), bf16, N(0, 1) inputs.
- quant: `fp8_rows` (default launch, then each --launches BLOCK_MxBLOCK_KxWARPS) against inductor's compile of the same
  torch ops, at K = dim (no GELU: qkv, proj inputs; through a LayerNorm: lin1's, norm2 fused) and K = 4 * dim
  (through GELU: lin2's input), with the compiled bf16 GELU or LayerNorm alone for scale; GB/s counts one read of x,
  one write of q and the scales.
- mlp: lin2(GELU(lin1(x))) compiled in bf16, through torchao's float8 row-wise Linears (fp8), and through
  `Fp8RowLinear` (fp8_fused); SQNR of each against the fp32 MLP.
Time: median over --iters of --reps back-to-back calls after --warmup (CUDA events), per call: one eager call of a
0.1 ms kernel would also time its Python dispatch.

python benchmarks/fp8_bench.py --out fp8.json   # H100/H200 (sm89+), estimated ~2 min
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from functools import partial
from pathlib import Path

import torch
from attn_bench import environment, time_ms
from torch import nn

from samrepro.kernels import fp8_rows as fr
from samrepro.patches.fp8 import Fp8Config
from samrepro.patches.fp8_fused import Fp8RowLinear

DIMS = {"vit_b": 768, "vit_h": 1280}
TOKENS = 4900  # 25 windows of 14 x 14 per image


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def repeat(fn, reps: int, *args) -> None:
    for _ in range(reps):
        fn(*args)


def quant_rows(
    x: torch.Tensor, gelu: bool, norm: bool, launches: list[tuple[int, ...]], args: argparse.Namespace
) -> dict:
    lb = Fp8Config().activation_value_lb
    layer_norm = nn.LayerNorm(x.shape[1], eps=1e-6, device="cuda", dtype=x.dtype)
    with torch.no_grad():
        layer_norm.weight.normal_(1, 0.5)
        layer_norm.bias.normal_(0, 0.2)
    ln = (layer_norm.weight, layer_norm.bias, layer_norm.eps) if norm else None
    ln_args = ln or (None, None, 1e-5)
    inductor = torch.compile(lambda t: fr.reference(t, gelu, lb, ln))
    q_ref, s_ref = inductor(x)
    q, s = fr.fp8_rows(x, gelu, lb, *ln_args)
    code_diff = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
    runs = {"inductor": lambda: inductor(x), "kernel": lambda: fr.fp8_rows(x, gelu, lb, *ln_args)}
    runs |= {f"kernel[{'x'.join(map(str, la))}]": partial(fr.fp8_rows, x, gelu, lb, *ln_args, *la) for la in launches}
    if gelu:
        runs["gelu_bf16_alone"] = partial(torch.compile(nn.functional.gelu), x)
    if norm:
        runs["layer_norm_bf16_alone"] = partial(torch.compile(layer_norm), x)
    gbytes = x.numel() * (x.element_size() + 1) / 1e9
    rows = {}
    for name, fn in runs.items():
        ms = statistics.median(time_ms(partial(repeat, fn, args.reps), "cuda", args.warmup, args.iters)) / args.reps
        rows[name] = {"ms": round(ms, 4), "GB/s": round(gbytes / ms * 1e3, 1)}
        print(f"  {name:24s} {ms:8.4f} ms {rows[name]['GB/s']:8.1f} GB/s", flush=True)
    scale_err = ((s - s_ref).abs() / s_ref).max().item()
    return {"times": rows, "codes_differing_from_inductor": code_diff, "scale_max_rel_diff": scale_err}


def mlp(x: torch.Tensor, dim: int, args: argparse.Namespace) -> dict:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)).cuda()
    with torch.no_grad():
        ref = fp32(x.float())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    torchao = copy.deepcopy(bf16)
    lb = Fp8Config().activation_value_lb
    quantize_(torchao, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=lb))
    fused = nn.Sequential(
        Fp8RowLinear(bf16[0], False, Fp8Config()), nn.Identity(), Fp8RowLinear(bf16[2], True, Fp8Config())
    )
    flops = 2 * x.shape[0] * dim * 4 * dim * 2
    rows = {}
    for name, model in (("bf16", bf16), ("fp8 (torchao)", torchao), ("fp8_fused", fused)):
        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(x)
            ms = statistics.median(time_ms(partial(repeat, compiled, args.reps, x), "cuda", args.warmup, args.iters))
            ms /= args.reps
        rows[name] = {"ms": round(ms, 4), "TFLOP/s": round(flops / ms / 1e9, 1), "sqnr_db": round(sqnr_db(ref, out), 2)}
        print(f"  mlp {name:16s} {ms:8.4f} ms {rows[name]['TFLOP/s']:7.1f} TFLOP/s {rows[name]['sqnr_db']:6.2f} dB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--models", default="vit_b,vit_h")
    parser.add_argument("--launches", default="", help="BLOCK_MxBLOCK_KxWARPS,... beside the default")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    launches = [tuple(int(v) for v in s.split("x")) for s in args.launches.split(",") if s]
    result = {"env": environment("cuda"), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for model in args.models.split(","):
        dim, m = DIMS[model], args.batch_size * TOKENS
        gen = torch.Generator("cuda").manual_seed(0)
        res = result["models"][model] = {}
        for k, gelu, norm in ((dim, False, False), (dim, False, True), (4 * dim, True, False)):
            print(f"{model} quant M={m} K={k} gelu={gelu} norm={norm}", flush=True)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            with torch.no_grad():
                res[f"quant_k{k}{'_norm' if norm else ''}"] = quant_rows(x, gelu, norm, launches, args)
        print(f"{model} mlp M={m}", flush=True)
        res["mlp"] = mlp(torch.randn(m, dim, device="cuda", dtype=torch.bfloat16, generator=gen), dim, args)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
