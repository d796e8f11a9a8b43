"""batched_decoder: one decoder call for a batch of images equals predict_torch per image, and composes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

import samrepro.patches.batched_decoder as bd
from samrepro import gates, workload
from samrepro.metrics import best_mask, mask_iou
from samrepro.patch import Tolerance
from samrepro.patches import bf16
from samrepro.registry import apply_patches
from samrepro.workload import Sample
from tests.conftest import make_samples

CPU = torch.device("cpu")
STACK = ["bf16", "sync_free", "sdpa", "batched_decoder"]


def mixed_batch(seed: int, boxes: bool, multi_point: bool) -> list[Sample]:
    """Images of different sizes and prompt counts; the second one has a single prompt."""
    samples = make_samples(seed, batch_size=4, max_prompts=5, boxes=boxes, multi_point=multi_point)
    one = samples[1]
    samples[1] = Sample(
        one.image,
        one.points[:1],
        one.labels[:1],
        None if one.boxes is None else one.boxes[:1],
        one.gt_masks[:1],
    )
    assert len({s.image.shape for s in samples}) > 1
    return samples


@torch.no_grad()
def both_paths(sam, samples: list[Sample], pad_rows: int = 0) -> tuple[list, list]:
    """Per-image predict_torch and predict_batch on the same features (plus `pad_rows` batch-padding images)."""
    x, input_sizes, original_sizes = workload.preprocess(sam, samples + samples[:1] * pad_rows, CPU)
    features = sam.image_encoder(x)  # B + pad_rows, C, h, w
    predictor = SamPredictor(sam)
    prompts = [workload.prompt_tensors(predictor, s, CPU) for s in samples]
    ref = [
        workload.predict_image(predictor, features[i : i + 1], input_sizes[i], original_sizes[i], p)
        for i, p in enumerate(prompts)
    ]
    return ref, sam.predict_batch(features, prompts, input_sizes, original_sizes)


def violations(ref: list[workload.Prediction], out: list, tol: Tolerance) -> list[str]:
    """Where predict_batch leaves `tol` of the per-image path (predicted IoU, best-of-3 mask agreement)."""
    found = []
    for i, (r, (masks, iou)) in enumerate(zip(ref, out)):
        assert masks.shape == r.masks.shape and masks.dtype == torch.bool and iou.shape == r.iou_pred.shape
        d_iou = (iou.float() - r.iou_pred).abs().max().item()
        agreement = mask_iou(best_mask(masks, iou), r.best).mean().item()
        if d_iou > tol.iou_pred_max_abs or agreement < tol.agreement_miou_min:
            found.append(f"image {i}: |d iou_pred| {d_iou:.2e}, agreement {agreement:.5f}")
    return found


@pytest.mark.parametrize("boxes, multi_point", [(False, False), (True, False), (False, True), (True, True)])
def test_predict_batch_equals_per_image(sam, boxes, multi_point):
    samples = mixed_batch(seed=3, boxes=boxes, multi_point=multi_point)
    with apply_patches(sam, ["batched_decoder"]):
        ref, out = both_paths(sam, samples, pad_rows=1)
    assert [m.shape[:2] for m, _ in out] == [(s.num_prompts, 3) for s in samples]  # SAM's 3-mask protocol
    assert violations(ref, out, bd.PATCH.tolerance) == []
    pixels = sum(m.numel() for m, _ in out)
    assert sum((m != r.masks).sum().item() for r, (m, _) in zip(ref, out)) <= 1e-4 * pixels  # logits at ~0 may flip


def test_mixed_layouts_skipped_and_unprompted_images(sam):
    """Images with other token layouts are decoded apart; None skips an image; no prompt decodes as upstream."""
    points = make_samples(5, batch_size=2, max_prompts=3, boxes=False, multi_point=False)
    with_boxes = make_samples(6, batch_size=1, max_prompts=3, boxes=True, multi_point=True)
    boxes_only = [Sample(s.image, None, None, s.boxes) for s in make_samples(7, 1, 3, boxes=True, multi_point=False)]
    unprompted = [Sample(points[0].image, None, None)]
    samples = points[:1] + with_boxes + boxes_only + unprompted + points[1:]
    with apply_patches(sam, ["batched_decoder"]):
        ref, out = both_paths(sam, samples)
        x, input_sizes, original_sizes = workload.preprocess(sam, samples, CPU)
        skipped = sam.predict_batch(sam.image_encoder(x), [None] * len(samples), input_sizes, original_sizes)
    assert violations(ref, out, bd.PATCH.tolerance) == []
    assert out[3][0].shape[:2] == (1, 3)  # upstream's single prediction from no prompt
    assert skipped == [None] * len(samples)


def test_single_mask_output(sam):
    samples = mixed_batch(seed=4, boxes=False, multi_point=False)
    with apply_patches(sam, ["batched_decoder"]):
        x, input_sizes, original_sizes = workload.preprocess(sam, samples, CPU)
        predictor = SamPredictor(sam)
        prompts = [workload.prompt_tensors(predictor, s, CPU) for s in samples]
        out = sam.predict_batch(sam.image_encoder(x), prompts, input_sizes, original_sizes, multimask_output=False)
    assert [m.shape[:2] for m, _ in out] == [(s.num_prompts, 1) for s in samples]


def test_wrong_image_embedding_is_detected(sam, monkeypatch):
    """A gather shifted by one image (each prompt sees its neighbour's embedding) fails the same check."""
    samples = mixed_batch(seed=3, boxes=False, multi_point=False)
    right = bd.per_prompt
    monkeypatch.setattr(bd, "per_prompt", lambda f, images, counts: right(f, images[1:] + images[:1], counts))
    with apply_patches(sam, ["batched_decoder"]):
        ref, out = both_paths(sam, samples)
    assert len(violations(ref, out, bd.PATCH.tolerance)) >= len(samples) - 1


def test_composes_with_bf16_sync_free_sdpa(sam):
    """All four stacked: predict_batch stays within bf16's tolerance of predict_torch on the same model."""
    samples = mixed_batch(seed=8, boxes=True, multi_point=True)
    with apply_patches(sam, STACK):
        assert sam.mask_decoder.forward.__func__ is not type(sam.mask_decoder).forward  # bf16's casts are kept
        ref, out = both_paths(sam, samples)
    assert all(iou.dtype == torch.float32 for _, iou in out)  # bf16's output dtype
    assert violations(ref, out, bf16.TOLERANCE) == []


def test_undo_is_exact(sam):
    samples = make_samples(9, batch_size=2, max_prompts=3, boxes=True, multi_point=False)
    assert gates.undo_violations(sam, gates.patches_for(STACK), samples) == []
    assert not hasattr(sam, "predict_batch") and "predict_masks" not in vars(sam.mask_decoder)


@torch.no_grad()
def test_official_predictor_unchanged(sam):
    """predict / predict_torch (one image's embedding, repeated upstream-style) and AMG give the same outputs."""
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    points, labels = np.array([[40.0, 50.0], [150.0, 120.0]]), np.array([1, 0])
    box = np.array([10, 20, 200, 150])

    def outputs():
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        single = predictor.predict(points, labels, box=box)
        coords = predictor.transform.apply_coords_torch(torch.tensor([[[40.0, 50.0]], [[150.0, 120.0]]]), (180, 240))
        batch = predictor.predict_torch(coords, torch.ones(2, 1))
        amg = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        segments = [torch.as_tensor(m["segmentation"]) for m in amg.generate(image)]
        return [*map(torch.as_tensor, single), *batch, *segments]

    before = outputs()
    with apply_patches(sam, ["batched_decoder"]):
        during = outputs()
    assert len(before) == len(during) and all(torch.equal(a, b) for a, b in zip(before, during))


@pytest.mark.cuda
def test_no_synchronising_call_on_cuda(device, tiny_ref):
    """With sync_free below it, predict_batch queues the whole batch without a device->host wait."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda")
    sam = copy.deepcopy(tiny_ref)
    samples = mixed_batch(seed=3, boxes=True, multi_point=True)
    with apply_patches(sam, ["sync_free", "batched_decoder"]), torch.no_grad():
        x, input_sizes, original_sizes = workload.preprocess(sam, samples, torch.device(device))
        prompts = [workload.prompt_tensors(SamPredictor(sam), s, torch.device(device)) for s in samples]
        features = sam.image_encoder(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sam.predict_batch(features, prompts, input_sizes, original_sizes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
