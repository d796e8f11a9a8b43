"""The timed workload and its protocol (docs/measurement.md, SAF-compatible without its bias).

Per batch of B images: the encoder on the batch, then `predict_torch` per real image (+ IoU against ground
truth on the device). Inputs, prompts and ground truth are on the device before the clock starts. The last
partial batch is padded with its first image so compiled shapes stay static; padded images are encoded but
neither decoded nor counted. The first batch runs WARMUP_RUNS times untimed (compile happens there), then every
later batch that brings the decoder a prompt count not seen yet runs once untimed: the first call of a shape
pays one-time costs (kernel selection, cuDNN attention plans) that SAF's 5,000-image runs spread thin and a
32-image run would not (docs/measurement.md).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from samrepro.metrics import mask_iou
from samrepro.workload import Prediction, Sample, decode_batch, preprocess, prompt_tensors

WARMUP_RUNS = 3
MIB = 1 << 20


@dataclass
class Masks:
    """One image's best masks, bit-packed on the host: (N, H, W) bool."""

    shape: tuple[int, ...]
    bits: torch.Tensor  # uint8, numpy.packbits of the flattened masks

    @classmethod
    def pack(cls, masks: torch.Tensor) -> Masks:
        flat = masks.detach().cpu().numpy().astype(bool).ravel()
        return cls(tuple(masks.shape), torch.from_numpy(np.packbits(flat)))

    def unpack(self) -> torch.Tensor:
        count = int(np.prod(self.shape))
        flat = np.unpackbits(self.bits.numpy(), count=count).astype(bool)
        return torch.from_numpy(flat).reshape(self.shape)


@dataclass
class Batch:
    """One batch, ready on the device."""

    x: torch.Tensor  # B, 3, S, S fp32, padded to B images
    real: int  # images counted (the rest is padding)
    input_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    prompts: list[dict | None]  # predict_torch kwargs per real image; None: no prompts
    gt: list[torch.Tensor | None]  # N, H, W bool per real image


@dataclass
class BenchResult:
    images: int  # real images, timed
    prompts: int
    timed_s: float
    encoder_s: float  # the image encoder's part of timed_s (padded images included, as they are encoded)
    compile_s: float  # the untimed warm-up: the first batch's runs, then one run of each batch with new decoder shapes
    latency_ms: list[float]  # per real image: its batch's time / real images in it
    peak_mem_mib: float | None
    peak_mem_reserved_mib: float | None
    memory_source: str  # how peak memory was measured
    best_masks: list[Masks] = field(repr=False)
    iou_preds: list[torch.Tensor] = field(repr=False)  # per image N, 3 fp32 (host)
    embeddings: torch.Tensor = field(repr=False)  # first batch, real images: n, C, h, w fp32 (host)
    miou_gt: float | None = None

    @property
    def img_s(self) -> float:
        return self.images / self.timed_s if self.timed_s > 0 else float("inf")

    @property
    def encoder_ms(self) -> float:
        """Encoder milliseconds per real image."""
        return self.encoder_s * 1e3 / self.images

    def latency_pct(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q))


def decoder_shapes(chunk: list[Sample]) -> set[int]:
    """The prompt counts a batch gives the mask decoder: each image's, and their sum (the packed decoder's call)."""
    counts = [s.num_prompts for s in chunk if s.num_prompts]
    return {*counts, sum(counts)}


def prepare(sam: Sam, predictor: SamPredictor, chunk: list[Sample], batch_size: int, device: torch.device) -> Batch:
    """Host work of one batch (resize, normalise, pad, prompts, ground truth), left on the device."""
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    x, input_sizes, original_sizes = preprocess(sam, padded, device)  # B, 3, S, S
    prompts = [prompt_tensors(predictor, s, device) if s.num_prompts else None for s in chunk]
    gt = [None if s.gt_masks is None else torch.as_tensor(s.gt_masks, device=device).bool() for s in chunk]
    return Batch(x, len(chunk), input_sizes[: len(chunk)], original_sizes[: len(chunk)], prompts, gt)


class EncoderSplit:
    """Where the encoder ends inside a timed batch: CUDA events on a GPU (no added sync), else the clock."""

    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.cuda, self.clock = device.type == "cuda", clock
        self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else [0.0, 0.0]

    def mark(self, i: int) -> None:
        """0 before the encoder, 1 after it."""
        if self.cuda:
            self.marks[i].record()
        else:
            self.marks[i] = self.clock()

    def seconds(self) -> float:
        """After the batch's sync: the encoder's seconds."""
        start, end = self.marks
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


def forward(
    sam: Sam, predictor: SamPredictor, batch: Batch, split: EncoderSplit | None = None
) -> tuple[torch.Tensor, list[Prediction | None], list[torch.Tensor]]:
    """The timed work: encoder on the batch, the decoder on every real image's prompts, IoU against ground truth."""
    if split:
        split.mark(0)
    features = sam.image_encoder(batch.x)  # B, C, h, w
    if split:
        split.mark(1)
    preds = decode_batch(sam, predictor, features, batch.prompts, batch.input_sizes, batch.original_sizes)
    ious = [mask_iou(p.best, g) for p, g in zip(preds, batch.gt) if p is not None and g is not None]  # N each
    return features, preds, ious


@torch.no_grad()
def run(
    sam: Sam,
    samples: list[Sample],
    batch_size: int,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
    warmup: int = WARMUP_RUNS,
) -> BenchResult:
    """Time the workload over `samples`; call right after loading and patching the model."""
    if not samples:
        raise ValueError("no images to benchmark")
    device = next(sam.parameters()).device
    predictor = SamPredictor(sam)
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    memory_source = reset_peak_memory(device)

    first = prepare(sam, predictor, chunks[0], batch_size, device)
    sync(device)
    start = clock()
    for _ in range(warmup):
        forward(sam, predictor, first)
    seen = decoder_shapes(chunks[0])
    for chunk in chunks[1:] if warmup else ():
        if not decoder_shapes(chunk) <= seen:
            forward(sam, predictor, prepare(sam, predictor, chunk, batch_size, device))
            seen |= decoder_shapes(chunk)
    sync(device)
    compile_s = clock() - start
    if progress:
        progress(0, len(samples))

    timed_s, encoder_s, latency_ms, best, iou_preds, gt_ious = 0.0, 0.0, [], [], [], []
    split = EncoderSplit(device, clock)
    embeddings = None
    for k, chunk in enumerate(chunks):
        batch = first if k == 0 else prepare(sam, predictor, chunk, batch_size, device)
        sync(device)
        start = clock()
        features, preds, ious = forward(sam, predictor, batch, split)
        sync(device)
        seconds = clock() - start
        timed_s += seconds
        encoder_s += split.seconds()
        latency_ms += [seconds * 1e3 / batch.real] * batch.real
        if k == 0:
            embeddings = features[: batch.real].float().cpu()
        for s, pred in zip(chunk, preds):
            h, w = s.image.shape[:2]
            best.append(Masks.pack(pred.best if pred else torch.zeros(0, h, w, dtype=torch.bool)))
            iou_preds.append(pred.iou_pred.float().cpu() if pred else torch.zeros(0, 3))
        gt_ious += [iou.cpu() for iou in ious]
        del batch, features, preds
        if progress:
            progress(sum(len(c) for c in chunks[: k + 1]), len(samples))

    has_gt = all(s.gt_masks is not None for s in samples if s.num_prompts)
    alloc, reserved = peak_memory(device, memory_source)
    return BenchResult(
        images=len(samples),
        prompts=sum(s.num_prompts for s in samples),
        timed_s=timed_s,
        encoder_s=encoder_s,
        compile_s=compile_s,
        latency_ms=latency_ms,
        peak_mem_mib=alloc,
        peak_mem_reserved_mib=reserved,
        memory_source=memory_source,
        best_masks=best,
        iou_preds=iou_preds,
        embeddings=embeddings,
        miou_gt=torch.cat(gt_ious).mean().item() if has_gt and gt_ious else None,
    )


def profile(
    sam: Sam, samples: list[Sample], batch_size: int, trace: Path, table: Path, memory_snapshot: Path | None
) -> None:
    """One more run of the first batch under torch.profiler, after the timed run (see `profile_call`)."""
    device = next(sam.parameters()).device
    predictor = SamPredictor(sam)
    batch = prepare(sam, predictor, samples[:batch_size], batch_size, device)
    profile_call(lambda: forward(sam, predictor, batch), device, trace, table, memory_snapshot)


@torch.no_grad()
def profile_call(
    call: Callable[[], object], device: torch.device, trace: Path, table: Path, memory_snapshot: Path | None
) -> None:
    """`call` once under torch.profiler: a Chrome/Perfetto trace (gzipped if `trace` ends in .gz) and `table`, the
    ops sorted by device time (CPU time on the CPU); on a GPU also a memory snapshot where one is asked for."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    if memory_snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    with torch.profiler.profile(activities=activities, record_shapes=True, acc_events=True) as prof:  # one cycle
        call()
        sync(device)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=80) + "\n")
    if memory_snapshot is not None:
        torch.cuda.memory._dump_snapshot(str(memory_snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)


def reset_peak_memory(device: torch.device) -> str:
    """Start the peak-memory window here; returns how the peak will be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # blocks freed by patches (e.g. bf16's fp32 originals) must not count as reserved
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated/max_memory_reserved since model load"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "VmHWM (peak RSS) since model load"
    except OSError:
        return "ru_maxrss (peak RSS of the whole process, model load included)"


def peak_memory(device: torch.device, source: str) -> tuple[float, float | None]:
    """(peak MiB, reserved MiB or None) for the window opened by reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB, torch.cuda.max_memory_reserved(device) / MIB
    if source.startswith("VmHWM"):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, None  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
