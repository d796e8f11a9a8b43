"""The training loop: learning-rate schedule, optimiser step, periodic logging and validation."""

from __future__ import annotations

import argparse
import math
import time

import torch
from segment_anything.modeling import Sam

from samrepro import workload
from samrepro.equivalence import gt_miou
from tools.train_tiny.loss import forward_loss


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.01 as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def validate(sam: Sam, samples: list[workload.Sample], batch: int = 64) -> float:
    """Ground-truth mIoU with the runner's protocol (fp32, best of 3 by predicted IoU, threshold 0)."""
    sam.eval()
    preds = []
    for i in range(0, len(samples), batch):
        preds += workload.run(sam, samples[i : i + batch])[1]
    sam.train()
    return gt_miou(preds, samples)


def train_step(
    sam: Sam, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], lr: float, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a CPU batch: (loss, parts) detached, on the model's device."""
    device = sam.pixel_mean.device
    on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "kinds"}
    for g in opt.param_groups:
        g["lr"] = lr
    loss, parts = forward_loss(sam, on_device, batch["kinds"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(sam.parameters(), clip)
    opt.step()
    return loss.detach(), parts


def fit(
    sam: Sam, opt: torch.optim.Optimizer, batches, val_set: list[workload.Sample], args: argparse.Namespace, t0: float
) -> tuple[int, str, dict]:
    """Train until `--steps` or the time budget: steps done, what stopped it, and the history."""
    history: dict = {"train": [], "val": []}
    sums, wait, step = torch.zeros(4, device=sam.pixel_mean.device), 0.0, 0  # sums: loss, focal, dice, iou mse
    t_start = t_window = time.perf_counter()
    while step < args.steps:
        if time.perf_counter() - t0 >= args.time_budget_s:
            return step, "time", history
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        progress = max(step / args.steps, (time.perf_counter() - t0) / args.time_budget_s)
        loss, parts = train_step(sam, opt, batch, args.lr * lr_factor(step, progress, args.warmup), args.clip)
        sums += torch.cat([loss[None], parts])
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            now, n = time.perf_counter(), (step - 1) % args.log_every + 1
            row = {"step": step, **dict(zip(("loss", "focal", "dice", "iou_mse"), (sums / n).tolist()))}
            row.update(lr=opt.param_groups[0]["lr"], img_s=n * args.batch_size / (now - t_window))
            row.update(data_wait=wait / (now - t_window), elapsed_s=now - t0)
            history["train"].append(row)
            left = min((args.steps - step) * (now - t_start) / step, args.time_budget_s - (now - t0))
            print(
                f"step {step:6d}  loss {row['loss']:.4f} (focal {row['focal']:.4f} dice {row['dice']:.3f} "
                f"iou {row['iou_mse']:.4f})  lr {row['lr']:.2e}  {row['img_s']:5.0f} img/s  "
                f"data wait {row['data_wait']:4.0%}  ETA {max(left, 0):4.0f} s",
                flush=True,
            )
            sums.zero_()
            wait, t_window = 0.0, time.perf_counter()
        if step % args.val_every == 0 and step < args.steps:
            t = time.perf_counter()
            miou = validate(sam, val_set)
            history["val"].append({"step": step, "miou": miou, "elapsed_s": time.perf_counter() - t0})
            print(f"step {step:6d}  val mIoU {miou:.4f} ({len(val_set)} images)", flush=True)
            t_window += time.perf_counter() - t  # throughput counts training time only
    return step, "steps", history
