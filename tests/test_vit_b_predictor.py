"""Every patch on a random-init vit_b encoder cut to two of its blocks, one windowed and one global (the 64 x 64
token grid, 14 x 14 windows with padding, vit_b's widths and heads; all twelve cost six times the CPU time): the
official SamPredictor runs, and undo restores everything."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samrepro import get_patch, list_patches
from samrepro.models import build, randomize
from samrepro.snapshot import tensors_equal

pytestmark = pytest.mark.slow
HEAVY = {"compile"}  # compiling vit_b on 2 CPU cores takes ~10 min: `pytest -m heavy` runs it; `nox -s tests` does not
ONE_MASK = {"best_mask_only"}  # its contract: only the best of the 3 multimask outputs comes back


@pytest.fixture(scope="module")
def vit_b():
    sam = build("vit_b")
    windowed, global_ = sam.image_encoder.blocks[0], sam.image_encoder.blocks[2]
    assert windowed.window_size == 14 and global_.window_size == 0
    sam.image_encoder.blocks = torch.nn.ModuleList([windowed, global_])
    return randomize(sam)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8)
    img[30:90, 40:110] = (200, 40, 40)  # one object to click on
    return img


def predict(sam, image):
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    points = np.array([[70.0, 60.0], [20.0, 10.0]], dtype=np.float32)
    return predictor.predict(point_coords=points, point_labels=np.array([1, 0]), multimask_output=True)


@pytest.fixture(scope="module")
def pristine(vit_b, image):
    return copy.deepcopy(vit_b), predict(vit_b, image)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in list_patches()]
)
def test_official_predictor_and_exact_undo(name, vit_b, image, pristine):
    reason = get_patch(name).unavailable_reason("cpu") or get_patch(name).workload_reason("points")
    if reason:
        pytest.skip(reason)  # a generator-only patch never reaches SamPredictor.predict
    reference, (ref_masks, ref_scores, ref_low) = pristine
    with get_patch(name).apply(vit_b):
        masks, scores, low = predict(vit_b, image)
    assert ref_masks.shape == (3, 120, 160) and masks.dtype == bool
    if name in ONE_MASK:
        assert masks.shape == (1, 120, 160) and np.array_equal(masks[0], ref_masks[np.argmax(ref_scores)])
    else:
        assert masks.shape == (3, 120, 160)
    assert scores.shape == (3,) and np.isfinite(scores).all() and np.isfinite(low).all()
    assert tensors_equal(vit_b, reference) == []
    after = predict(vit_b, image)
    for a, b in zip(after, (ref_masks, ref_scores, ref_low)):
        assert np.array_equal(a, b)
    assert all(type(m) is type(r) for m, r in zip(vit_b.modules(), reference.modules()))
    assert torch.equal(vit_b.prompt_encoder.get_dense_pe(), reference.prompt_encoder.get_dense_pe())
