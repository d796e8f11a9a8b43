"""amg_postprocess: the generator's records on the patched model equal upstream's exactly, its RLE equals
upstream's, and the class it replaces a method of is restored when the last patched model is undone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import mask_to_rle_pytorch

from samrepro import amg, get_patch
from samrepro.patches import amg_postprocess as ap
from tests.conftest import make_samples

FIELDS = ("bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box")


def records(sam, image: np.ndarray, **options) -> list[dict]:
    kwargs = amg.settings("tiny", {"points_per_side": 8}) | options
    return SamAutomaticMaskGenerator(sam, **kwargs).generate(image)


def same(a: dict, b: dict) -> bool:
    seg_a, seg_b = a["segmentation"], b["segmentation"]
    equal = np.array_equal(seg_a, seg_b) if isinstance(seg_a, np.ndarray) else seg_a == seg_b
    return equal and all(a[k] == b[k] for k in FIELDS)


@pytest.fixture(scope="module")
def image():
    return make_samples(seed=11, batch_size=1, max_prompts=1, boxes=False, multi_point=False)[0].image


@pytest.mark.parametrize("crop_n_layers", [0, 1])
@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
def test_records_equal_upstream(tiny_ref, image, crop_n_layers, output_mode):
    sam = copy.deepcopy(tiny_ref)
    options = dict(crop_n_layers=crop_n_layers, output_mode=output_mode)
    expected = records(sam, image, **options)
    calls = []
    with get_patch("amg_postprocess").apply(sam), torch.no_grad():
        rles = ap.rles
        ap.rles = lambda masks: calls.append(len(masks)) or rles(masks)
        try:
            got = records(sam, image, **options)
        finally:
            ap.rles = rles
    assert calls, "the patched path never ran"
    assert len(expected) > 0 and len(got) == len(expected)
    assert all(same(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("seed", range(4))
def test_rle_equals_upstream(seed):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(5, 7, 9, generator=gen) > 0.5  # K, H, W
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True  # first pixel set: counts start with a 0-length run
    masks[3, 0, 0] = False
    assert ap.rles(masks) == mask_to_rle_pytorch(masks)
    assert ap.rles(masks[:0]) == []


def test_class_is_restored_after_the_last_patched_model(tiny_ref, image):
    patch = get_patch("amg_postprocess")
    a, b, plain = (copy.deepcopy(tiny_ref) for _ in range(3))
    undo_a, undo_b = patch.apply(a), patch.apply(b)
    assert SamAutomaticMaskGenerator._process_batch is ap._process_batch
    undo_a.undo()
    assert SamAutomaticMaskGenerator._process_batch is ap._process_batch  # b still patched
    assert not hasattr(a, ap.MARK) and getattr(b, ap.MARK)
    calls = []
    rles = ap.rles
    ap.rles = lambda masks: calls.append(1) or rles(masks)
    try:
        with torch.no_grad():
            records(plain, image)  # a generator over an unpatched model: upstream's code
            assert calls == []
            records(b, image)
            assert calls
    finally:
        ap.rles = rles
    undo_b.undo()
    assert SamAutomaticMaskGenerator._process_batch is ap.UPSTREAM
