"""Interactive latency: one image embedded, then one click at a time (`benchmarks/peer_side_by_side.py --latency`).

Batch 1 throughout. Per image, outside the clock: resize, normalise, pad and the prompts mapped to the input frame
(`samrepro.bench.prepare`). Timed, each call on its own with a sync before it: (a) the image encoder on the one
image, (b) every single-point prompt alone through prompt encoder, mask decoder and upsampling to the original size
(multimask, best of 3 by predicted IoU). The first `warmup` images run untimed. Reported: p50/p90 of (a), of (b)
and p50(a) + p50(b), the time from a new image to its first mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from samrepro.bench import Batch, Masks, peak_memory, prepare, reset_peak_memory
from samrepro.workload import Sample, decode_batch

# make_batch([sample]) -> a contender's inputs, made outside the clock; encode(inputs) -> features (1, C, h, w);
# click(inputs, features, k) -> the best mask (1, H, W) of prompt k alone
MakeBatch = Callable[[list[Sample]], object]
Encode = Callable[[object], torch.Tensor]
Click = Callable[[object, torch.Tensor, int], torch.Tensor]


def one_prompt(batch: Batch, k: int) -> dict:
    """predict_torch kwargs of the k-th prompt of the batch's one image: (1, 1, 2) coords, (1, 1) labels."""
    prompts = batch.prompts[0]
    return {name: None if t is None else t[k : k + 1] for name, t in prompts.items()}


def official_driver(sam, predictor, device: torch.device) -> tuple[MakeBatch, Encode, Click]:
    """The official model, patched or not, driven as the runner drives it (`decode_batch`: a patched batched
    decoder is used for the one prompt too)."""

    def make_batch(chunk: list[Sample]) -> Batch:
        return prepare(sam, predictor, chunk, 1, device)

    def encode(batch: Batch) -> torch.Tensor:
        return sam.image_encoder(batch.x)  # 1, C, h, w

    def click(batch: Batch, features: torch.Tensor, k: int) -> torch.Tensor:
        sizes = batch.input_sizes, batch.original_sizes
        (pred,) = decode_batch(sam, predictor, features, [one_prompt(batch, k)], *sizes)
        return pred.best  # 1, H, W

    return make_batch, encode, click


def timed_call(device: torch.device, fn: Callable, *args):
    """fn(*args) and its milliseconds, measured alone: CUDA events after a sync on a GPU, the clock on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn(*args)
        return out, (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn(*args)
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


@torch.no_grad()
def measure_latency(
    make_batch: MakeBatch, encode: Encode, click: Click, samples: list[Sample], warmup: int, device: torch.device
) -> tuple[dict, list[Masks]]:
    """Latency stats of one contender and its best masks (every prompt of every image, clicked one by one)."""
    source = reset_peak_memory(device)
    encoder_ms, click_ms, masks = [], [], []
    for i, sample in enumerate([*samples[:warmup], *samples]):
        batch = make_batch([sample])
        features, ms = timed_call(device, encode, batch)
        clicks = [timed_call(device, click, batch, features, k) for k in range(sample.num_prompts)]
        if i < warmup:
            continue
        encoder_ms.append(ms)
        click_ms += [ms for _, ms in clicks]
        masks.append(Masks.pack(torch.cat([best for best, _ in clicks])))  # N, H, W bool
    alloc, reserved = peak_memory(device, source)
    p = {name: np.percentile(values, [50, 90]) for name, values in (("encoder", encoder_ms), ("click", click_ms))}
    stats = {
        "images": len(samples),
        "clicks": len(click_ms),
        "encoder_p50_ms": p["encoder"][0],
        "encoder_p90_ms": p["encoder"][1],
        "click_p50_ms": p["click"][0],
        "click_p90_ms": p["click"][1],
        "first_mask_p50_ms": p["encoder"][0] + p["click"][0],
        "peak_mem_mib": alloc,
        "peak_mem_reserved_mib": reserved,
        "memory_source": source,
    }
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in stats.items()}, masks
