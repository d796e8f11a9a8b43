"""Interactive latency: one image embedded, then one click at a time (`samrepro ablate --workload interactive`,
`benchmarks/peer_side_by_side.py --latency`).

Batch 1 throughout. Per image, outside the clock: resize, normalise, pad and the prompts mapped to the input frame
(`samrepro.bench.prepare`). Timed, each call on its own with a sync before it: (a) the image encoder on the one
image, (b) every single-point prompt alone through prompt encoder, mask decoder and upsampling to the original size
(multimask, best of 3 by predicted IoU). The first `warmup` images run untimed. Reported: p50/p90 of (a), of (b)
and of (a) + the image's first click, the time from a new image to its first mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from samrepro.bench import Batch, Masks, peak_memory, prepare, reset_peak_memory
from samrepro.workload import Prediction, Sample, decode_batch

# make_batch([sample]) -> a contender's inputs, made outside the clock; encode(inputs) -> features (1, C, h, w);
# click(inputs, features, k) -> prompt k alone: its best mask (1, H, W), or the official model's whole Prediction
MakeBatch = Callable[[list[Sample]], object]
Encode = Callable[[object], torch.Tensor]
Click = Callable[[object, torch.Tensor, int], torch.Tensor | Prediction]


def one_prompt(batch: Batch, k: int) -> dict:
    """predict_torch kwargs of the k-th prompt of the batch's one image: (1, 1, 2) coords, (1, 1) labels."""
    prompts = batch.prompts[0]
    return {name: None if t is None else t[k : k + 1] for name, t in prompts.items()}


def official_driver(sam, predictor, device: torch.device) -> tuple[MakeBatch, Encode, Click]:
    """The official model, patched or not, driven as the runner drives it (`decode_batch`: a patched batched
    decoder is used for the one prompt too); a click gives the prompt's Prediction (masks, IoU scores, best)."""

    def make_batch(chunk: list[Sample]) -> Batch:
        return prepare(sam, predictor, chunk, 1, device)

    def encode(batch: Batch) -> torch.Tensor:
        return sam.image_encoder(batch.x)  # 1, C, h, w

    def click(batch: Batch, features: torch.Tensor, k: int) -> Prediction:
        sizes = batch.input_sizes, batch.original_sizes
        (pred,) = decode_batch(sam, predictor, features, [one_prompt(batch, k)], *sizes)
        return pred

    return make_batch, encode, click


def best(out: torch.Tensor | Prediction) -> torch.Tensor:
    """A click's best mask, 1, H, W bool."""
    return out.best if isinstance(out, Prediction) else out


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


@dataclass
class LatencyRun:
    """One model's clicks: timings per image and per prompt, and what each click returned."""

    encoder_ms: list[float]  # per timed image
    click_ms: list[float]  # per timed prompt
    first_mask_ms: list[float]  # per timed image with a prompt: its encoder call + its first click
    outputs: list[list[Any]] = field(repr=False)  # per timed image, what `click` returned for each prompt
    features: torch.Tensor | None = field(repr=False)  # the first timed image's embedding: 1, C, h, w fp32 (host)
    warmup_s: float
    peak_mem_mib: float | None
    peak_mem_reserved_mib: float | None
    memory_source: str

    def masks(self, sizes: list[tuple[int, int]]) -> list[Masks]:
        """Per image (original size H, W each), the best mask of every prompt: N, H, W bool, packed."""
        return [
            Masks.pack(torch.cat([best(o) for o in outs]) if outs else torch.zeros(0, *hw, dtype=torch.bool))
            for outs, hw in zip(self.outputs, sizes, strict=True)
        ]

    def stats(self) -> dict[str, Any]:
        """p50/p90 of the encoder, the clicks and the time to a new image's first mask (milliseconds), and memory."""
        pct = {"encoder": self.encoder_ms, "click": self.click_ms, "first_mask": self.first_mask_ms}
        out: dict[str, Any] = {"images": len(self.encoder_ms), "clicks": len(self.click_ms)}
        for name, values in pct.items():
            p50, p90 = np.percentile(values, [50, 90]) if values else (None, None)
            out |= {f"{name}_p50_ms": _float(p50), f"{name}_p90_ms": _float(p90)}
        return out | {
            "warmup_s": self.warmup_s,
            "peak_mem_mib": self.peak_mem_mib,
            "peak_mem_reserved_mib": self.peak_mem_reserved_mib,
            "memory_source": self.memory_source,
        }


def _float(value) -> float | None:
    return None if value is None else float(value)


@torch.no_grad()
def measure_latency(
    make_batch: MakeBatch,
    encode: Encode,
    click: Click,
    samples: list[Sample],
    warmup: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyRun:
    """Every prompt of every image clicked one by one, the first `warmup` images untimed (they compile)."""
    if not samples:
        raise ValueError("no images to click on")
    source = reset_peak_memory(device)
    encoder_ms, click_ms, first_mask_ms, outputs, features = [], [], [], [], None
    warm = samples[:warmup]  # fewer than `warmup` when there are fewer images
    start = time.perf_counter()
    for i, sample in enumerate([*warm, *samples]):
        if i == len(warm):
            warmup_s = time.perf_counter() - start
            if progress:
                progress(0, len(samples))
        batch = make_batch([sample])
        feats, ms = timed_call(device, encode, batch)
        clicks = [timed_call(device, click, batch, feats, k) for k in range(sample.num_prompts)]
        if i < len(warm):
            continue
        features = feats.float().cpu() if features is None else features
        encoder_ms.append(ms)
        click_ms += [ms for _, ms in clicks]
        if clicks:
            first_mask_ms.append(ms + clicks[0][1])
        outputs.append([out for out, _ in clicks])
        if progress:
            progress(i - len(warm) + 1, len(samples))
    alloc, reserved = peak_memory(device, source)
    return LatencyRun(
        encoder_ms, click_ms, first_mask_ms, outputs, features, warmup_s, alloc, reserved, memory_source=source
    )
