"""The "segment everything" workload: the official SamAutomaticMaskGenerator on every image, timed per image.

The generator runs as users run it: its own settings (the official defaults unless an option below says otherwise)
and its default output, binary masks. Each image's whole `generate` call is timed, from a device sync to a device
sync: the host resize inside `set_image`, the encoder, the decoder over every batch of grid points, the filters,
NMS and the masks' encoding. The first image runs WARMUP_RUNS times untimed first (compile happens there). After
the clock stops, each mask is stored as COCO RLE, which is what accuracy is measured on (amg_compare.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from samrepro.bench import WARMUP_RUNS, peak_memory, reset_peak_memory, sync
from samrepro.workload import Sample

# What `samrepro ablate --workload amg` may set, with the generator's own defaults. 32 points per side is the
# official default (1,024 points per image); CPU and CI runs pass fewer.
OPTIONS = {"points_per_side": 32, "points_per_batch": 64, "crop_n_layers": 0}
# The generator's filters. The official values are tuned for ViT-H and keep no mask of the tiny model, whose
# stability scores top out at 0.94 (16 synthetic val images, 16 points per side, shipped weights). At 0.7 and 0.7
# it keeps 6.7 masks per image there, 85% of them matching a ground-truth object at IoU >= 0.5.
FILTERS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
TINY_FILTERS = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.7}

Rle = dict[str, Any]  # COCO RLE: {"size": [h, w], "counts": str}


def settings(model: str, options: dict[str, int]) -> dict[str, Any]:
    """The generator's keyword arguments for `model`: OPTIONS with `options` over them, then the filters."""
    return OPTIONS | options | (TINY_FILTERS if model == "tiny" else FILTERS)


def generator(sam: Sam, kwargs: dict[str, Any]) -> SamAutomaticMaskGenerator:
    return SamAutomaticMaskGenerator(sam, **kwargs)


def prompts_per_image(gen: Any) -> int:
    """Grid points the generator decodes per image: layer i has 4**i crops, each with that layer's grid."""
    return sum(len(grid) * 4**i for i, grid in enumerate(gen.point_grids))


@dataclass
class AmgResult:
    images: int
    prompts_per_image: int  # grid points per image, every crop layer
    timed_s: float
    compile_s: float  # the untimed warm-up runs on the first image
    latency_ms: list[float]  # per image
    peak_mem_mib: float | None
    peak_mem_reserved_mib: float | None
    memory_source: str
    masks: list[list[Rle]] = field(repr=False)  # per image, per mask
    embeddings: torch.Tensor | None = field(default=None, repr=False)  # the first image's: 1, C, h, w fp32 (host)

    @property
    def img_s(self) -> float:
        return self.images / self.timed_s if self.timed_s > 0 else float("inf")

    @property
    def masks_per_image(self) -> float:
        return sum(len(m) for m in self.masks) / self.images

    def latency_pct(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q))


def to_rle(mask: np.ndarray) -> Rle:
    """(H, W) bool -> COCO RLE with text counts (torch.load's weights_only reads it back)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


@torch.no_grad()
def run(
    sam: Sam,
    samples: list[Sample],
    kwargs: dict[str, Any],
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
    warmup: int = WARMUP_RUNS,
) -> AmgResult:
    """Time the official generator over `samples` (their images only: prompts and ground truth are not used); call
    right after loading and patching the model."""
    device = next(sam.parameters()).device
    out = time_generator(generator(sam, kwargs), samples, device, clock, progress, warmup)
    out.embeddings = first_embedding(sam, samples[0])
    return out


@torch.no_grad()
def time_generator(
    gen: Any,
    samples: list[Sample],
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
    warmup: int = WARMUP_RUNS,
) -> AmgResult:
    """Time any generator with the official `generate(image) -> list of dicts` (and `point_grids`) over `samples`;
    the peak memory counts from here, so the model's weights are in it."""
    if not samples:
        raise ValueError("no images to benchmark")
    memory_source = reset_peak_memory(device)

    sync(device)
    start = clock()
    for _ in range(warmup):
        gen.generate(samples[0].image)
    sync(device)
    compile_s = clock() - start
    if progress:
        progress(0, len(samples))

    latency_ms, masks = [], []
    for k, s in enumerate(samples):
        sync(device)
        start = clock()
        records = gen.generate(s.image)
        sync(device)
        latency_ms.append((clock() - start) * 1e3)
        masks.append([to_rle(r["segmentation"]) for r in records])
        if progress:
            progress(k + 1, len(samples))

    alloc, reserved = peak_memory(device, memory_source)
    return AmgResult(
        images=len(samples),
        prompts_per_image=prompts_per_image(gen),
        timed_s=sum(latency_ms) / 1e3,
        compile_s=compile_s,
        latency_ms=latency_ms,
        peak_mem_mib=alloc,
        peak_mem_reserved_mib=reserved,
        memory_source=memory_source,
        masks=masks,
    )


@torch.no_grad()
def first_embedding(sam: Sam, sample: Sample) -> torch.Tensor:
    """The image embedding the generator's first crop (the whole image) starts from, untimed: 1, C, h, w fp32."""
    predictor = SamPredictor(sam)
    predictor.set_image(sample.image)
    return predictor.features.float().cpu()
