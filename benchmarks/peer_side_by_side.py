"""Official SAM fp32, segment-anything-fast's fast model and samrepro's two best stacks, side by side in one process.

Same seeded random weights and workload for all: 1024x1024 seeded noise images, B per encoder batch, then P
single-point prompts per image through the decoder (multimask_output=True, best of 3 by predicted IoU, threshold 0).
Prints and writes (JSON) img/s, warm-up (compile) seconds, peak memory and agreement mIoU with the official masks.

Runs on any machine with a CUDA GPU and samrepro installed (`pip install -e .`), with a checkout of SAF:
    git clone --depth 1 https://github.com/pytorch-labs/segment-anything-fast ../segment-anything-fast
    # one run per model; as run for the fp8_fused reports on the H100:
    python benchmarks/peer_side_by_side.py --saf-dir ../segment-anything-fast --out peer.json \
        --model vit_b --images 128 --compile-mode reduce-overhead \
        --samrepro-configs '{"compile": {"coordinate_descent_tuning": false}}'
    # the same with --model vit_h --images 48
    # interactive latency (samrepro.latency): batch 1, the encoder per image, then each prompt alone: --latency
    # segment everything: --workload amg times each image's whole SamAutomaticMaskGenerator.generate (SAF: its own
    # generator, process_batch_size 8 as in its amg_example; samrepro: AMG_STACK) and matches every official mask
    # to the contender's best-IoU mask (samrepro.amg_compare); --points-per-side/-batch, --crop-n-layers as the runner
    # With the random weights the filters keep no mask (vit_b on a CPU, 4² points: 0 per image), so the matched
    # columns stay empty and each image's time is the encoder, the decoder and the filters, without NMS or RLEs
    # two samrepro contenders: samrepro runs BEST, which changes the encoder weights (fp8_fused, with its own
    # tolerance), samrepro-keep KEEP_WEIGHTS, the fastest stack that keeps them (--samrepro-patches, --keep-patches)
    # samrepro's prompt encoder and mask decoder run in fp16 unless --samrepro-configs gives bf16 another decoder
    # (its agreement: vit_b 0.959 with a bf16 decoder, 0.989 with fp16, at the same speed;
    # reports/2026-11-21-h100-decoder-precision-and-bs1-waterfalls).
    # Warm-up on an H100 with reduce-overhead (reports/2026-11-21-h100-fold_attn-split-windows-and-peer): SAF 126 s
    # (vit_b) and 253 s (vit_h), its flash_4 kernel autotuning 60 configs; samrepro vit_b 143 s with compile's default
    # coordinate-descent tuning. The vit_h run with that tuning on ran past 10 minutes inside samrepro's warm-up,
    # hence the config above.
On a GPU machine without internet, `bash benchmarks/device.sh peer ARGS` does the same from wheels carried in
.whl/ and a clone in the git-ignored .peer/ folder.

One process, so that all three meet the same machine (SAF's checkout, model and driver: peer_saf.py, with the
differences from SAF's own protocol that stay). Between contenders the model is freed and dynamo (with its CUDA
graphs) reset; the memory still allocated then is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from segment_anything import SamPredictor

from samrepro import amg, apply_patches, env, get_patch, load_model, plans
from samrepro.amg_compare import mask_deviation
from samrepro.bench import WARMUP_RUNS, Masks, forward, peak_memory, prepare, reset_peak_memory
from samrepro.data import SIDE, noise_samples
from samrepro.latency import measure_latency, official_driver
from samrepro.metrics import mask_iou
from samrepro.models import fp32_reference_mode
from samrepro.patch import PatchUnavailable
from samrepro.workload import Sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks.` from the repository root
from benchmarks.peer_saf import FLASH_4_CONFIGS, checkout_info, flash_4_choices, saf_contender, saf_model  # noqa: E402
from benchmarks.peer_tables import amg_table, latency_table, table  # noqa: E402

# the default order; official runs first: its masks are the reference. samrepro runs --samrepro-patches (default
# BEST), samrepro-keep --keep-patches (default KEEP_WEIGHTS): both stacks in one run
CONTENDERS = ("official", "saf", "samrepro", "samrepro-keep")
AMG_CONTENDERS = ("official", "saf", "samrepro")  # AMG_STACK keeps the weights already
MIB = 1 << 20
# beyond.toml's compile_decoder step, the fastest stack that changes no weights (fold_attn lost to the one-hot-bias
# kernel: vit_h 64.10 with it, 64.66 without; reports/2026-11-21-h100-onehot-kernel-and-peer); BEST adds fp8_fused
# (reports/2026-11-21-h100-fp8_fused-and-relgemm, reports/2026-11-22-h100-fp8-norm-fusion-and-peer)
KEEP_WEIGHTS = (
    "bf16,sync_free,sdpa,triton_attn,batched_decoder,channels_last,best_mask_only,compile_decoder,gelu_epilogue,compile"
)
BEST = KEEP_WEIGHTS.replace(",gelu_epilogue,", ",fp8_fused,")  # fp8_fused computes GELU in lin2's quantization
# compile's one-pass row reductions up to 2,048 elements (vit_h's 1,280-channel LayerNorms; inductor's own limit is
# 1,024): vit_h weights kept 76.30 -> 78.55 img/s (reports/2026-12-07-h100-persistent-rows-stacks-profile)
PERSISTENT_ROWS = 2048


def plan_stack(name: str) -> str:
    """The patches of a shipped plan's last step, all of its steps applied (comma-joined)."""
    plan = plans.load(plans.shipped_plans_dir() / f"{name}.toml")
    return ",".join(plans.resolve(plan, "cumulative", lambda _: None)[-1].patches)


# the AMG plan's last step, read from it: the generator reads all 3 masks per point and calls predict_torch, so
# batched_decoder and best_mask_only have no part in it
AMG_STACK = plan_stack("amg")


def timed(run_batch, batch, device: torch.device) -> tuple[list[torch.Tensor], float]:
    """run_batch(batch) and its milliseconds: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        return run_batch(batch), (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)  # the host work of this batch is done before the clock starts
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = run_batch(batch)
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


@torch.no_grad()
def measure(make_batch, run_batch, samples: list[Sample], args, device: torch.device) -> tuple[dict, list[Masks]]:
    """Warm up on the first batch (untimed, reported), then time every batch; best masks packed on the host."""
    source = reset_peak_memory(device)  # right after the model is built: the peak includes its weights
    chunks = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    first = make_batch(chunks[0])  # a last partial batch is padded with its first image, which is not decoded
    start = time.perf_counter()
    for _ in range(args.warmup):
        run_batch(first)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s, total_ms, masks = time.perf_counter() - start, 0.0, []
    for k, chunk in enumerate(chunks):
        best, ms = timed(run_batch, first if k == 0 else make_batch(chunk), device)
        total_ms += ms
        masks += [Masks.pack(b) for b in best]  # N, H, W bool each
    alloc, reserved = peak_memory(device, source)
    stats = {"images": len(samples), "timed_s": total_ms / 1e3, "img_s": len(samples) * 1e3 / total_ms}
    memory = {"peak_mem_mib": alloc, "peak_mem_reserved_mib": reserved, "memory_source": source}
    return stats | {"warmup_s": warmup_s} | memory, masks


def amg_generator(name: str, args, device: torch.device, record: dict):
    """The contender's automatic mask generator: SAF's own (amg_example's process_batch_size) over SAF's model, the
    official one over the official or patched model; all with the same settings."""
    kwargs = amg.settings(args.model, args.amg_options)
    if name in args.stacks and args.samrepro_points_per_batch:  # the masks do not depend on it, the memory does
        kwargs["points_per_batch"] = args.samrepro_points_per_batch
    record["amg_settings"] = kwargs
    if name == "saf":
        saf, sam = saf_model(args, device, record)
        record["process_batch_size"] = args.saf_process_batch_size
        return saf.SamAutomaticMaskGenerator(sam, process_batch_size=args.saf_process_batch_size, **kwargs)
    return amg.generator(contender_model(name, args, device, record), kwargs)


def contender_model(name: str, args, device: torch.device, record: dict):
    """The official model in fp32, or with samrepro's patches for the samrepro contender."""
    sam = load_model(args.model, str(device), "random", args.seed)
    record["weights"] = sam.weights_label
    if name in args.stacks:
        patches = args.stacks[name]
        given = {n: c for n, c in args.samrepro_configs.items() if n in patches}  # configs may name either stack's
        record["patches"] = patches  # and every config field, defaults included:
        record["configs"] = {n: get_patch(n).config_cls.from_dict(given.get(n, {})).to_dict() for n in patches}
        apply_patches(sam, patches, given)
    return sam


def build(name: str, args, device: torch.device, record: dict):
    """make_batch and run_batch of one contender; its model lives only in them, so it goes when they do."""
    if name == "saf":
        return saf_contender(args, device, record)
    sam = contender_model(name, args, device, record)
    predictor = SamPredictor(sam)  # the runner's workload (samrepro.bench): predict_torch per image
    if args.latency:
        return official_driver(sam, predictor, device)
    return (
        lambda chunk: prepare(sam, predictor, chunk, args.batch_size, device),
        lambda batch: [p.best for p in forward(sam, predictor, batch)[1]],  # N, H, W bool per real image
    )


def contender_cwd(name: str, args):
    """A temporary cwd; SAF's is --saf-configs-dir when given, so flash_4's pickled choice outlives the run."""
    if name == "saf" and args.saf_configs_dir is not None:
        args.saf_configs_dir.mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext(args.saf_configs_dir)
    return tempfile.TemporaryDirectory()


def run_contender(name: str, samples: list[Sample], args, device: torch.device) -> tuple[dict, list[Masks] | None]:
    """One contender's record (status ok / skipped / failed with the reason) and its best masks."""
    record: dict = {"contender": name, "status": "ok", "reason": None}
    if device.type == "cuda":
        record["resident_before_mib"] = torch.cuda.memory_allocated(device) / MIB  # left by earlier contenders
    try:
        with contender_cwd(name, args) as cwd, contextlib.chdir(cwd):
            if args.workload == "amg":
                out = amg.time_generator(amg_generator(name, args, device, record), samples, device, warmup=args.warmup)
                return record | amg_stats(out), out.masks
            contender = build(name, args, device, record)
            if args.latency:
                run = measure_latency(*contender, samples, args.warmup, device)
                stats, masks = run.stats(), run.masks([s.image.shape[:2] for s in samples])
            else:
                stats, masks = measure(*contender, samples, args, device)
            if name == "saf":
                record["flash_4_launches"] = flash_4_choices()  # what the timed run used, autotuned or carried
        return record | stats, masks
    except PatchUnavailable as e:  # cannot run here: the message is the reason
        return record | {"status": "skipped", "reason": str(e)}, None
    except Exception as e:  # recorded; the other contenders still run
        traceback.print_exc()
        return record | {"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0]}, None
    finally:
        gc.collect()
        torch._dynamo.reset()  # compiled code and CUDA-graph pools of this contender
        if device.type == "cuda":
            torch.cuda.empty_cache()


def amg_stats(out: amg.AmgResult) -> dict:
    """An AMG run's record: img/s, latency per image, warm-up, memory, masks per image."""
    return {
        "images": out.images, "prompts_per_image": out.prompts_per_image, "timed_s": out.timed_s,
        "img_s": out.img_s, "latency_p50_ms": out.latency_pct(50), "latency_p90_ms": out.latency_pct(90),
        "warmup_s": out.compile_s, "peak_mem_mib": out.peak_mem_mib, "peak_mem_reserved_mib": out.peak_mem_reserved_mib,
        "memory_source": out.memory_source, "masks_per_image": out.masks_per_image,
    }  # fmt: skip


def agreement(ref: list[Masks], masks: list[Masks]) -> float:
    """Mean IoU over all prompts of best masks against the official fp32 ones."""
    return torch.cat([mask_iou(r.unpack(), m.unpack()) for r, m in zip(ref, masks, strict=True)]).mean().item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("vit_b", "vit_l", "vit_h"), required=True)
    p.add_argument("--saf-dir", type=Path, help="segment-anything-fast checkout (needed for the saf contender)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--device", default="cuda")
    p.add_argument("--contenders", help=f"of {','.join(CONTENDERS)}; default all (AMG: {','.join(AMG_CONTENDERS)})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8, help="single-point prompts per image")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="of the weights and the workload")
    p.add_argument("--warmup", type=int, default=WARMUP_RUNS, help="untimed runs of the first batch")
    p.add_argument("--samrepro-patches", help="default: BEST, the fastest gated stack (AMG: AMG_STACK)")
    p.add_argument("--keep-patches", default=KEEP_WEIGHTS, help="samrepro-keep's: the fastest that changes no weights")
    p.add_argument("--samrepro-configs", type=json.loads, default={}, help='JSON, e.g. {"compile": {"mode": "..."}}')
    modes = ("max-autotune", "reduce-overhead", "default", "none")
    p.add_argument("--compile-mode", choices=modes, default="max-autotune", help="SAF's and samrepro's encoder")
    p.add_argument("--saf-decoder", choices=("nested", "loop"), default="nested", help="SAF's NT step, or per image")
    p.add_argument("--latency", action="store_true", help="batch 1: encoder and single-click latency p50/p90")
    p.add_argument("--saf-configs-dir", type=Path, help=f"SAF's cwd, to reuse its {FLASH_4_CONFIGS} (default: temp)")
    p.add_argument("--workload", choices=("points", "amg"), default="points", help="amg: SamAutomaticMaskGenerator")
    for option, default in amg.OPTIONS.items():
        p.add_argument(f"--{option.replace('_', '-')}", type=int, default=default, help="--workload amg")
    p.add_argument("--saf-process-batch-size", type=int, default=8, help="SAF's generator (its amg_example's value)")
    p.add_argument(
        "--samrepro-points-per-batch", type=int, help="samrepro's generator only (SAF decodes 8 batches at once)"
    )
    args = p.parse_args(argv)
    if args.workload == "amg" and args.latency:
        p.error("--latency times the point-prompt workload; --workload amg times each image's whole generate call")
    args.amg_options = {k: getattr(args, k) for k in amg.OPTIONS}
    if args.samrepro_patches is None:
        args.samrepro_patches = AMG_STACK if args.workload == "amg" else BEST
    if args.latency:
        args.batch_size = 1
    if args.contenders is None:
        args.contenders = ",".join(AMG_CONTENDERS if args.workload == "amg" else CONTENDERS)
    given = [c for c in args.contenders.split(",") if c in CONTENDERS]  # in the order given, the reference first
    args.contenders = sorted(dict.fromkeys(given), key=lambda c: c != "official")
    args.samrepro_patches = [n for n in args.samrepro_patches.split(",") if n]
    stacks = {"samrepro": args.samrepro_patches, "samrepro-keep": [n for n in args.keep_patches.split(",") if n]}
    args.stacks = {name: stacks[name] for name in args.contenders if name in stacks}
    running = {n for patches in args.stacks.values() for n in patches}
    if "compile" in running:
        if args.compile_mode == "none":
            p.error("--compile-mode none: drop compile from --samrepro-patches and --keep-patches")
        compile_config = args.samrepro_configs.setdefault("compile", {})
        compile_config.setdefault("mode", args.compile_mode)
        compile_config.setdefault("persistent_rows", PERSISTENT_ROWS)
    if "bf16" in running:  # as in the blog plans (fp16 decoder)
        args.samrepro_configs.setdefault("bf16", {}).setdefault("decoder", "float16")
    unused = sorted(set(args.samrepro_configs) - running)
    if unused and args.stacks:
        p.error(f"--samrepro-configs: {unused} are in no stack that runs")
    if "saf" in args.contenders and args.saf_dir is None:
        p.error("the saf contender needs --saf-dir")
    args.out, args.saf_dir = args.out.resolve(), args.saf_dir and args.saf_dir.resolve()  # contenders run elsewhere
    args.saf_configs_dir = args.saf_configs_dir and args.saf_configs_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    fp32_reference_mode()  # the official contender is the TF32-off fp32 reference
    samples = noise_samples(args.images, args.prompts, args.seed)
    keys = ("model", "device", "batch_size", "prompts", "images", "seed", "warmup", "latency", "workload")
    workload = {k: getattr(args, k) for k in keys}
    workload["inputs"] = f"seeded uint8 noise {SIDE}x{SIDE}, uniform single foreground points; random weights"
    if args.workload == "amg":  # the generator's own grid: batch size and prompts take no part
        workload |= {"amg_settings": amg.settings(args.model, args.amg_options), "batch_size": 1, "prompts": None}
    environment = env.capture() | {"saf": checkout_info(args.saf_dir) if args.saf_dir else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records, ref = [], None
    for name in args.contenders:
        print(f"--- {name}", flush=True)
        record, masks = run_contender(name, samples, args, device)
        ref = masks if name == "official" else ref
        if masks is not None and ref is not None:
            amg_run = args.workload == "amg"
            record |= mask_deviation(ref, masks) if amg_run else {"miou_agreement": agreement(ref, masks)}
        records.append(record)  # written after each contender: a run cut short keeps what it measured
        args.out.write_text(json.dumps({"workload": workload, "env": environment, "contenders": records}, indent=2))
    print(amg_table(records) if args.workload == "amg" else latency_table(records) if args.latency else table(records))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
