"""best_mask_only: the kept mask and the IoU predictions are bit-identical, per image and batched, bf16 too."""

from __future__ import annotations

import pytest
import torch
from segment_anything import SamPredictor

from samrepro import workload
from samrepro.data import noise_samples
from samrepro.patches.best_mask_only import keep_best, postprocess_masks
from samrepro.registry import apply_patches
from tests.conftest import make_samples


def test_keep_best_takes_the_first_highest():
    masks = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)  # N, 3, h, w
    iou = torch.tensor([[0.1, 0.9, 0.9], [0.7, 0.2, 0.3]])
    kept = keep_best(masks, iou)
    assert kept.shape == (2, 1, 2, 2)
    assert torch.equal(kept[0, 0], masks[0, 1]) and torch.equal(kept[1, 0], masks[1, 0])


@pytest.mark.parametrize("original", [(80, 120), (256, 256)])
def test_postprocess_skips_only_an_identity_resize(sam, original):
    low = torch.randn(3, 1, 64, 64)  # N, 1, h, w logits
    input_size = (256, 256) if original == (256, 256) else (171, 256)
    assert torch.equal(
        postprocess_masks(sam, low, input_size, original), sam.postprocess_masks(low, input_size, original)
    )


@pytest.mark.parametrize("stack", [[], ["batched_decoder"], ["bf16", "sync_free", "sdpa", "batched_decoder"]])
def test_kept_mask_and_scores_are_bit_identical(sam, stack):
    samples = make_samples(3, batch_size=3, max_prompts=4, boxes=False, multi_point=False)
    samples += noise_samples(1, 3, seed=1, side=256)  # input frame == original size: the resize is skipped
    with apply_patches(sam, stack):
        _, ref = workload.run(sam, samples)
        with apply_patches(sam, ["best_mask_only"]):
            _, out = workload.run(sam, samples)
    for r, o in zip(ref, out):
        assert o.masks.shape[1] == 1 and r.masks.shape[1] == 3
        assert torch.equal(o.best, r.best) and torch.equal(o.iou_pred, r.iou_pred)


def test_single_mask_output_is_unchanged(sam):
    (s,) = make_samples(4, batch_size=1, max_prompts=2, boxes=True, multi_point=True)
    predictor = SamPredictor(sam)
    predictor.set_image(s.image)
    ref = predictor.predict(s.points[0], s.labels[0], s.boxes[0], multimask_output=False)
    with apply_patches(sam, ["best_mask_only"]):
        out = predictor.predict(s.points[0], s.labels[0], s.boxes[0], multimask_output=False)
    assert all((a == b).all() for a, b in zip(ref, out))
