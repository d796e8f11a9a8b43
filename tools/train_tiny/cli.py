"""Train the embedded `tiny` SAM on the synthetic set: weights (safetensors), provenance JSON and a training report.

The weights are bit-reproducible on CPU for a fixed seed when `--steps` ends the run; a run cut by `--time-budget-s`
anneals its learning rate by elapsed time instead, so its length (and result) depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from samrepro import models
from samrepro.data import load_dataset
from tools.train_tiny.data import TrainBatches
from tools.train_tiny.loop import fit, validate
from tools.train_tiny.plot import write_report
from tools.train_tiny.weights import provenance, save_weights


def parse(argv: list[str] | None) -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100_000, help="schedule length; the time budget usually ends it")
    p.add_argument("--time-budget-s", type=float, default=480.0, help="stop training after this many seconds")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--prompts-per-image", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200, help="steps")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--num-workers", type=int, default=max(cpus - 2, 0), help="data processes (0: in the main one)")
    p.add_argument("--val-images", type=int, default=200, help="validation images (synthetic val split)")
    p.add_argument("--val-every", type=int, default=500, help="steps")
    p.add_argument("--log-every", type=int, default=50, help="steps")
    p.add_argument("--data-dir", type=Path, default=Path("results/data"), help="cache of the validation set")
    p.add_argument("--init", type=Path, help="start from these weights (a continued run) instead of a fresh init")
    p.add_argument("--out", type=Path, default=models.TINY_WEIGHTS.parent)
    p.add_argument("--report-dir", type=Path, default=Path("reports/2026-11-21-h100-tiny-training"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse(argv)
    torch.manual_seed(args.seed)
    models.fp32_reference_mode()  # validation is fp32 without TF32; training runs under bf16 autocast anyway
    loader = DataLoader(
        TrainBatches(args.seed, args.batch_size, args.prompts_per_image),
        batch_size=None,
        num_workers=args.num_workers,
        prefetch_factor=2 if args.num_workers else None,
        pin_memory=args.device.startswith("cuda"),
    )
    batches = iter(loader)  # workers start now, before CUDA is initialised, and run while the val set loads
    val_set, val_label = load_dataset("synthetic", args.val_images, args.data_dir)
    sam = models.build_tiny()
    if args.init:
        sam.load_state_dict(models.load_state(args.init))
    sam = sam.to(args.device).train()
    decay = [p for p in sam.parameters() if p.dim() >= 2]
    no_decay = [p for p in sam.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, fused=sam.pixel_mean.is_cuda)  # fused: fewer launches
    print(f"train-tiny: {args.device}, {args.num_workers} data workers, val {val_label}", flush=True)
    step, stopped_by, history = fit(sam, opt, batches, val_set, args, t0)
    del batches, loader  # stop the data workers

    miou = validate(sam, val_set)
    history["val"].append({"step": step, "miou": miou, "elapsed_s": time.perf_counter() - t0})
    print(f"final  step {step}  val mIoU {miou:.4f} ({len(val_set)} images)  stopped by {stopped_by}", flush=True)
    weights = args.out / "sam_tiny.safetensors"
    digest = save_weights(sam, weights)
    run = {"steps": step, "stopped_by": stopped_by, "images_seen": step * args.batch_size, "val": val_label}
    run.update(val_miou=miou, val_images=len(val_set), wall_s=time.perf_counter() - t0, sha256=digest)
    weights.with_suffix(".json").write_text(json.dumps(provenance(sam, args, **run), indent=1) + "\n")
    write_report(history, args.report_dir)
    print(f"wrote {weights} (sha256 {digest[:12]}), report in {args.report_dir}", flush=True)
    return 0
