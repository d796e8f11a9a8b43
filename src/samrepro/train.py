"""Train the embedded `tiny` SAM on the synthetic set: weights (safetensors), provenance JSON and a training report.

Data order: step b trains on train-split images b*B .. b*B+B-1 of `samrepro.data.synthetic`, each drawn from its own
generator `image_rng("train", seed, index)`, which then also draws that image's prompts. DataLoader worker w makes
batches w, w+W, w+2W, ... and the loader hands them out in order, so the data is the same for any worker count.
The weights are bit-reproducible on CPU for a fixed seed when `--steps` ends the run; a run cut by `--time-budget-s`
anneals its learning rate by elapsed time instead, so its length (and result) depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.ops import sigmoid_focal_loss

from samrepro import models, workload
from samrepro.data import center_point, load_dataset
from samrepro.data.synthetic import SPLITS, VERSION, image_rng, make_image
from samrepro.equivalence import gt_miou

SIZE = 256  # tiny's input side
RESIZE = ResizeLongestSide(SIZE)
P_MAX = 4  # points of a multi-point prompt, padded with label -1
POINT, BOX, MULTI = 0, 1, 2  # prompt kinds
KIND_P = (0.6, 0.2, 0.2)  # the evaluation uses single points only, so they dominate
CENTER_P = 0.5  # share of single points at the evaluation's center point (the rest uniform inside the mask)
FOCAL_W, DICE_W, IOU_W = 20.0, 1.0, 1.0
PAD_LOGIT = -30.0  # logits forced outside the image: no loss, no gradient, never counted as foreground


def pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ys, xs of a (H, W) bool mask's pixels, searched within its bounding box only."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    ys, xs = np.nonzero(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return ys + rows[0], xs + cols[0]


def sample_prompts(
    rng: np.random.Generator, mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, kind: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One prompt for `mask` (H, W) bool, whose pixels are ys, xs, in its pixel frame.

    Returns points (P_MAX, 2) x, y, labels (P_MAX,) (-1 unused) and box (4,) x0, y0, x1, y1.
    """
    points, labels, box = np.zeros((P_MAX, 2), np.float32), np.full(P_MAX, -1, np.int64), np.zeros(4, np.float32)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    h, w = mask.shape

    def inside() -> tuple[int, int]:
        i = rng.integers(len(xs))
        return xs[i], ys[i]

    if kind == BOX:  # SAM-style jitter: std 10% of the side, at most 20 px
        noise = np.clip(rng.normal(0, 0.1, 4) * [x1 - x0, y1 - y0, x1 - x0, y1 - y0], -20, 20)
        box[:] = np.clip([x0, y0, x1, y1] + noise, 0, [w - 1, h - 1, w - 1, h - 1])
    elif kind == POINT:
        if rng.random() < CENTER_P:  # the evaluation's point, searched in the bounding box only (faster)
            cx, cy = center_point(mask[y0 : y1 + 1, x0 : x1 + 1])
            points[0] = x0 + cx, y0 + cy
        else:
            points[0] = inside()
        labels[0] = 1
    else:  # MULTI: a positive point, then 1..P_MAX-1 more, each positive or a negative near the object
        points[0], labels[0] = inside(), 1
        mx, my = (x1 - x0) // 2 + 1, (y1 - y0) // 2 + 1  # margin around the box for negatives
        bx0, by0 = max(x0 - mx, 0), max(y0 - my, 0)
        oy, ox = np.nonzero(~mask[by0 : y1 + my + 1, bx0 : x1 + mx + 1])
        for j in range(1, int(rng.integers(2, P_MAX + 1))):
            if rng.random() < 0.5 and len(ox):
                i = rng.integers(len(ox))
                points[j], labels[j] = (bx0 + ox[i], by0 + oy[i]), 0
            else:
                points[j], labels[j] = inside(), 1
    return points, labels, box


def make_example(seed: int, index: int, slots: int) -> dict[str, np.ndarray]:
    """Train image `index` in the model frame, with `slots` prompts cycling over its objects in random order."""
    rng = image_rng("train", seed, index)
    image, masks = make_image(rng)
    size = image.shape[:2]
    h, w = RESIZE.get_preprocess_shape(*size, SIZE)
    padded = np.zeros((SIZE, SIZE, 3), np.uint8)
    padded[:h, :w] = RESIZE.apply_image(image)
    objects = [masks[i] for i in rng.permutation(len(masks))[:slots]]
    resized = [RESIZE.apply_image(m.astype(np.uint8) * 255) >= 128 for m in objects]  # h, w each: like the image
    coords = [pixels(m) for m in objects]
    kinds = rng.choice(3, size=slots, p=KIND_P)
    gt = np.zeros((slots, SIZE, SIZE), bool)
    prompts = []
    for j, kind in enumerate(kinds):
        o = j % len(objects)
        gt[j, :h, :w] = resized[o]
        prompts.append(sample_prompts(rng, objects[o], *coords[o], kind))
    points, labels, boxes = (np.stack(p) for p in zip(*prompts))
    return {
        "image": padded.transpose(2, 0, 1),  # 3, S, S uint8, not yet normalised
        "size": np.array([h, w]),
        "masks": gt,  # slots, S, S
        "kinds": kinds,  # slots
        "points": RESIZE.apply_coords(points, size).astype(np.float32),  # slots, P_MAX, 2 in the model frame
        "labels": labels,  # slots, P_MAX
        "boxes": RESIZE.apply_boxes(boxes, size).astype(np.float32),  # slots, 4
    }


def make_batch(seed: int, batch: int, batch_size: int, slots: int) -> dict[str, torch.Tensor]:
    """Batch number `batch`: train images batch*batch_size onwards, stacked."""
    examples = [make_example(seed, batch * batch_size + i, slots) for i in range(batch_size)]
    return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


class TrainBatches(IterableDataset):
    """Endless batches; with W workers, worker w makes batches w, w+W, ... (the loader interleaves them in order)."""

    def __init__(self, seed: int, batch_size: int, slots: int) -> None:
        self.seed, self.batch_size, self.slots = seed, batch_size, slots

    def __iter__(self):
        info = get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for b in itertools.count(first, stride):
            yield make_batch(self.seed, b, self.batch_size, self.slots)


def normalize(sam: Sam, image: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sam.preprocess` for a padded uint8 batch (B, 3, S, S): normalised input and the valid-pixel mask (B, S, S)."""
    r = torch.arange(SIZE, device=image.device)
    valid = (r[None, :, None] < size[:, 0, None, None]) & (r[None, None, :] < size[:, 1, None, None])  # B, S, S
    x = (image.float() - sam.pixel_mean) / sam.pixel_std
    return torch.where(valid[:, None], x, 0.0), valid


def decode(
    dec: MaskDecoder, emb: torch.Tensor, pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` with the image embedding already expanded to one per prompt.

    emb, dense (N, C, h, w); pe (1, C, h, w); sparse (N, T, C) -> masks (N, 4, 4h, 4w) logits, iou (N, 4).
    """
    n, c, h, w = emb.shape
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])  # 1 + 4, C
    tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse], dim=1)  # N, 5 + T, C
    hs, src = dec.transformer(emb + dense, pe.expand(n, -1, -1, -1), tokens)  # N, 5 + T, C; N, h*w, C
    up = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))  # N, C/8, 4h, 4w
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)  # N, 4, C/8
    masks = (hyper @ up.flatten(2)).view(n, -1, *up.shape[-2:])  # N, 4, 4h, 4w
    return masks, dec.iou_prediction_head(hs[:, 0])


def mask_losses(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal, dice and true IoU (each N, M) of low-res logits (N, M, h, w) against target, valid (N, S, S) bool.

    The loss is taken at the input resolution S, after the same bilinear upsampling as `Sam.postprocess_masks`,
    so training sees the boundaries that the evaluation thresholds.
    """
    logits = F.interpolate(logits.float(), (SIZE, SIZE), mode="bilinear", align_corners=False)  # N, M, S, S
    logits = logits.masked_fill(~valid[:, None], PAD_LOGIT)
    t = target[:, None].expand_as(logits)
    # alpha=-1: no class weighting, so logit 0 stays the decision boundary that the evaluation thresholds at
    focal = sigmoid_focal_loss(logits, t.float(), alpha=-1, reduction="none").mean((-2, -1))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    hard = logits > 0
    inter, union = (hard & t).sum((-2, -1)), (hard | t).sum((-2, -1))
    iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)  # both empty count as 1, as metrics.mask_iou
    return focal, dice, iou


def encode_prompts(sam: Sam, batch: dict[str, torch.Tensor], kinds: torch.Tensor) -> list[tuple]:
    """Per prompt kind present: (kind, prompt indices (N,) on CPU, sparse (N, T, C), dense (N, C, h, w)), in fp32.

    Prompts are grouped by kind on the CPU; the official point embedding indexes with boolean masks (a device sync),
    which is cheap here, before the image encoder's work is queued. bf16 would blur the point positions.
    """
    device = sam.pixel_mean.device
    points, labels = batch["points"].flatten(0, 1), batch["labels"].flatten(0, 1)  # B*K, P_MAX, 2; B*K, P_MAX
    out = []
    for kind in (POINT, BOX, MULTI):
        sel = (kinds.flatten() == kind).nonzero().squeeze(1)  # N
        if not len(sel):
            continue
        sel_d = sel.to(device)
        if kind == BOX:
            sparse, dense = sam.prompt_encoder(points=None, boxes=batch["boxes"].flatten(0, 1)[sel_d], masks=None)
        else:
            p = P_MAX if kind == MULTI else 1
            sparse, dense = sam.prompt_encoder(points=(points[sel_d, :p], labels[sel_d, :p]), boxes=None, masks=None)
        out.append((kind, sel, sparse, dense))
    return out


def forward_loss(sam: Sam, batch: dict[str, torch.Tensor], kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over all prompts and its parts (focal, dice, iou mse) of a batch on the model's device.

    `kinds` (B, K) stays on the CPU. Single points get 3 masks and the loss of the best one (SAM's ambiguity rule);
    boxes and multi-point prompts get mask 0. The IoU head learns every output mask's true IoU.
    """
    device = sam.pixel_mean.device
    b, k = kinds.shape
    owner = torch.arange(b).repeat_interleave(k)  # B*K: image of each prompt
    target = batch["masks"].flatten(0, 1)  # B*K, S, S
    prompts = encode_prompts(sam, batch, kinds)
    pe = sam.prompt_encoder.get_dense_pe()  # 1, C, h, w
    x, valid = normalize(sam, batch["image"], batch["size"])
    cast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    with cast:
        emb = sam.image_encoder(x)  # B, C, h, w
    parts = torch.zeros(3, device=device)
    for kind, sel, sparse, dense in prompts:
        sel_d, img = sel.to(device), owner[sel].to(device)  # N, N
        with cast:
            masks, iou_pred = decode(sam.mask_decoder, emb[img], pe, sparse, dense)  # N, 4, 4h, 4w; N, 4
        out = slice(1, None) if kind == POINT else slice(0, 1)
        focal, dice, iou = mask_losses(masks[:, out], target[sel_d], valid[img])  # N, M each
        best = (FOCAL_W * focal + DICE_W * dice).argmin(1, keepdim=True)  # N, 1
        iou_mse = (iou_pred[:, out].float() - iou).pow(2).mean(1)  # N
        parts += torch.stack([focal.gather(1, best).sum(), dice.gather(1, best).sum(), iou_mse.sum()])
    parts = parts / (b * k)
    return FOCAL_W * parts[0] + DICE_W * parts[1] + IOU_W * parts[2], parts.detach()


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


def save_weights(sam: Sam, path: Path) -> str:
    """The whole state_dict as fp32 contiguous safetensors, written atomically; returns its SHA-256."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in sam.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; the package ships it
    os.replace(tmp, path)
    return models.sha256(path)


def architecture(sam: Sam) -> dict:
    """build_tiny's configuration, read back from the model."""
    enc, dec = sam.image_encoder, sam.mask_decoder
    return {
        "builder": "samrepro.models.build_tiny",
        "img_size": enc.img_size,
        "patch_size": enc.patch_embed.proj.kernel_size[0],
        "embed_dim": enc.patch_embed.proj.out_channels,
        "depth": len(enc.blocks),
        "num_heads": enc.blocks[0].attn.num_heads,
        "window_size": max(blk.window_size for blk in enc.blocks),
        "global_attn_indexes": [i for i, blk in enumerate(enc.blocks) if blk.window_size == 0],
        "decoder_depth": len(dec.transformer.layers),
        "num_multimask_outputs": dec.num_multimask_outputs,
        "parameters": sum(p.numel() for p in sam.parameters()),
    }


def write_report(history: dict, report_dir: Path) -> None:
    """history.json and a PNG of training loss and validation mIoU over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "history.json").write_text(json.dumps(history, indent=1))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train, val = history["train"], history["val"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in val], [r["miou"] for r in val], "o-", color="tab:orange", label="val mIoU")
    ax2.set_ylabel("val mIoU (center point, best of 3)", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title("tiny SAM on the synthetic set")
    fig.tight_layout()
    fig.savefig(report_dir / "training.png", dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(prog="samrepro train-tiny", description=__doc__.splitlines()[0])
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


def provenance(sam: Sam, args: argparse.Namespace, **run) -> dict:
    """The JSON shipped next to the weights: architecture, recipe, data, environment, and the `run` results."""
    device = sam.pixel_mean.device
    return {
        "model": "tiny",
        "config": architecture(sam),
        "seed": args.seed,
        "init": None if args.init is None else {"file": args.init.name, "sha256": models.sha256(args.init)},
        "batch_size": args.batch_size,
        "prompts_per_image": args.prompts_per_image,
        "lr": args.lr,
        "optimizer": f"AdamW, weight decay {args.weight_decay} (matrices only), grad norm clip {args.clip}",
        "schedule": f"warm-up {args.warmup} steps, then cosine to 1% by max(step/steps, time/budget)",
        "loss": f"{FOCAL_W} focal + {DICE_W} dice (best of 3 for single points) + {IOU_W} IoU MSE, at {SIZE} px",
        "prompts": {"kind_p(point, box, multi)": KIND_P, "center_point_p": CENTER_P, "max_points": P_MAX},
        "data": {
            "generator": "samrepro.data.synthetic.make_image",
            "generator_version": VERSION,
            "train": f"image_rng('train', {args.seed}, index), split key {SPLITS['train']}, index = step*B + i",
        },
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "segment_anything": version("segment-anything"),
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "num_workers": args.num_workers,
        "time_budget_s": args.time_budget_s,
        **run,
    }


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


if __name__ == "__main__":
    raise SystemExit(main())
