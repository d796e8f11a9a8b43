"""Where sparse24 + triton_attn faults on a GPU: each variant in its own process, since an illegal memory access
poisons the CUDA context. Every kernel call's q/k/v layout (strides, storage, furthest element read) is recorded.
The device is synchronised after every attention kernel and, in eager variants, after every semi-structured
Linear, so that the traceback in each variant's log names the operation that faulted.

    CUDA_LAUNCH_BLOCKING=1 python3 benchmarks/sparse24_attention_layouts.py --out layouts.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# name: (model, patches, configs, copy q/k/v to row-major at the kernel's entry)
BF16 = {"bf16": {"decoder": "float16"}}
STACK = ["bf16", "sparse24", "triton_attn"]
COMPILED = {**BF16, "compile": {"mode": "default"}}
VARIANTS = {
    "tiny-eager": ("tiny", STACK, BF16, False),
    "tiny-eager-rowmajor": ("tiny", STACK, BF16, True),
    "tiny-eager-masked": ("tiny", STACK, {**BF16, "sparse24": {"kernel": "masked"}}, False),
    "tiny-eager-no-tables": ("tiny", STACK, {**BF16, "triton_attn": {"window_tables": False}}, False),
    "tiny-compiled": ("tiny", [*STACK, "compile"], COMPILED, False),
    "tiny-compiled-rowmajor": ("tiny", [*STACK, "compile"], COMPILED, True),
    "vit_b-eager": ("vit_b", STACK, BF16, False),
    "vit_b-eager-rowmajor": ("vit_b", STACK, BF16, True),
    "tiny-eager-sdpa": ("tiny", ["bf16", "sparse24", "sdpa"], BF16, False),
}


def layout(t):
    """Shape, strides and whether every element the strides address lies inside the tensor's storage."""
    furthest = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    storage = t.untyped_storage().nbytes() // t.element_size()
    return {"shape": list(t.shape), "stride": list(t.stride()), "offset": t.storage_offset(), "storage": storage,
            "in_bounds": furthest < storage}  # fmt: skip


def child(name: str) -> dict:
    import torch

    import samrepro
    from samrepro.kernels import rel_pos_attention as rpa
    from samrepro.patches import sparse24

    model, patches, configs, rowmajor = VARIANTS[name]
    seen, original = [], rpa._run

    def traced(q, k, v, *args, **kwargs):
        entry = {"tables": kwargs.get("tables"), **{n: layout(t) for n, t in zip("qkv", (q, k, v))}}
        if entry not in seen:
            seen.append(entry)
        if rowmajor:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = original(q, k, v, *args, **kwargs)
        torch.cuda.synchronize()
        return out

    def synced_linear(self, x):
        out = linear_2d(self, x)
        torch.cuda.synchronize()
        return out

    rpa._run, linear_2d = traced, sparse24.linear_2d
    if "compile" not in patches:  # a sync inside a compiled region would break the graph
        sparse24.linear_2d = synced_linear
    sam = samrepro.load_model(model, "cuda", "random")
    size = sam.image_encoder.img_size
    x = torch.randn(8, 3, size, size, device="cuda")
    with torch.no_grad(), samrepro.apply_patches(sam, patches, configs):
        out = sam.image_encoder(x)
        out = sam.image_encoder(x)  # a compiled encoder's second call runs what the first compiled
        torch.cuda.synchronize()
    return {"finite": bool(torch.isfinite(out).all()), "layouts": seen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--child")
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return 0
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}

    def run(name):
        start = time.monotonic()
        cmd = [sys.executable, __file__, "--out", args.out, "--child", name]
        env_v = {**env, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/inductor-{name}"}
        try:
            p = subprocess.run(cmd, env=env_v, capture_output=True, text=True, timeout=args.timeout)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        with open(f"{args.out}.{name}.log", "w") as f:
            f.write(text)
        result = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        errors = [line for line in text.splitlines() if "Error" in line or "error" in line][-3:]
        return name, {"rc": rc, "seconds": round(time.monotonic() - start, 1), "result": result[0] if result else None,
                      "errors": errors}  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        report = dict(pool.map(run, VARIANTS))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for name, r in report.items():
        ok = r["result"] and r["result"]["finite"]
        print(f"{name:26} rc={r['rc']} {r['seconds']:6.1f}s {'ok' if ok else 'FAILED'} {r['errors'][-1:]}")
        for entry in (r["result"] or {}).get("layouts", []):
            print("   ", json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
