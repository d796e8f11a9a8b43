"""The interactive workload (`samrepro ablate --workload interactive`): SAM as a click-to-segment tool is used.

One image at a time is embedded, then each of its prompts is decoded alone, as clicks arrive (samrepro.latency
times both, each call on its own). What a step records: p50/p90 of the time from a new image to its first mask
(`latency_ms_*`), of one click (`click_ms_*`), the encoder's mean per image, and img/s of the whole loop (every
image embedded and every prompt clicked, one after the other). Accuracy is compared as in the points workload
(compare.Outputs): each click's best mask and IoU scores, the first image's embedding, mIoU against ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from samrepro import bench
from samrepro.compare import Outputs
from samrepro.latency import LatencyRun, best, measure_latency, official_driver
from samrepro.metrics import mask_iou
from samrepro.workload import Sample


@dataclass
class InteractiveResult:
    run: LatencyRun
    sizes: list[tuple[int, int]] = field(repr=False)  # each image's original H, W
    miou_gt: float | None

    @property
    def images(self) -> int:
        return len(self.run.encoder_ms)

    @property
    def memory_source(self) -> str:
        return self.run.memory_source

    @property
    def timed_s(self) -> float:
        return (sum(self.run.encoder_ms) + sum(self.run.click_ms)) / 1e3

    @property
    def img_s(self) -> float:
        return self.images / self.timed_s if self.timed_s > 0 else float("inf")

    def outputs(self) -> Outputs:
        iou_preds = [
            torch.cat([o.iou_pred.cpu() for o in outs]) if outs else torch.zeros(0, 3) for outs in self.run.outputs
        ]  # per image: N, 3
        return Outputs(self.run.masks(self.sizes), iou_preds, self.run.features, self.miou_gt)


def run(
    sam: Sam,
    samples: list[Sample],
    progress: Callable[[int, int], None] | None = None,
    warmup: int = bench.WARMUP_RUNS,
) -> InteractiveResult:
    """Click every prompt of `samples` one by one on `sam` (patched or not), after `warmup` untimed images."""
    device = next(sam.parameters()).device
    clicks = measure_latency(*official_driver(sam, SamPredictor(sam), device), samples, warmup, device, progress)
    return InteractiveResult(clicks, [s.image.shape[:2] for s in samples], gt_miou(clicks, samples))


def gt_miou(clicks: LatencyRun, samples: list[Sample]) -> float | None:
    """Mean IoU of every click's best mask with its object's ground truth; None where a sample has none."""
    if any(s.gt_masks is None for s in samples if s.num_prompts):
        return None
    ious = [
        mask_iou(torch.cat([best(o).cpu() for o in outs]), torch.as_tensor(s.gt_masks))
        for outs, s in zip(clicks.outputs, samples, strict=True)
        if outs
    ]  # N per image
    return torch.cat(ious).mean().item() if ious else None


def profile(sam: Sam, samples: list[Sample], trace: Path, table: Path, snapshot: Path | None) -> None:
    """The first image embedded and its prompts clicked, once, under the profiler."""
    device = next(sam.parameters()).device
    make_batch, encode, click = official_driver(sam, SamPredictor(sam), device)
    batch = make_batch(samples[:1])

    def one_image() -> None:
        features = encode(batch)
        for k in range(samples[0].num_prompts):
            click(batch, features, k)

    bench.profile_call(torch.no_grad()(one_image), device, trace, table, snapshot)
