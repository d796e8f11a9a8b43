"""amg_postprocess: the generator's records and per-batch MaskData on a patched model equal upstream's exactly, its
RLE encoder equals upstream's, and the generator class is patched only while a patched model is alive."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import generate_crop_boxes, mask_to_rle_pytorch

from samrepro import amg, get_patch
from samrepro.inputs import unavailable
from samrepro.patches import amg_postprocess as ap
from samrepro.registry import apply_patches
from tests.conftest import make_samples

PATCH = get_patch("amg_postprocess")
UPSTREAM = SamAutomaticMaskGenerator.__dict__["_process_batch"]  # the class's own, before any test patches it


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Two synthetic images; with 8 points per side and one crop layer, the second has a batch with no stable mask
    (upstream then returns float boxes for its crop: bbox 3.0, not 3)."""
    samples = make_samples(seed=3, batch_size=4, max_prompts=1, boxes=False, multi_point=False)
    return [samples[0].image, samples[3].image]


@pytest.fixture
def fast_path(monkeypatch) -> list[int]:
    """Counts the patched path's batches (a spy on process_batch, which the installed method looks up by name)."""
    calls: list[int] = []
    real = ap.process_batch

    def spy(gen, points, *args):
        calls.append(len(points))
        return real(gen, points, *args)

    monkeypatch.setattr(ap, "process_batch", spy)
    return calls


def records(sam, image: np.ndarray, **options) -> list[tuple]:
    """The generator's records, each value as its repr (so 3 and 3.0, or float32 and float64 scores, differ)."""
    kwargs = amg.settings("tiny", {"points_per_side": 8}) | options
    with torch.no_grad():
        out = SamAutomaticMaskGenerator(sam, **kwargs).generate(image)
    seg = (lambda s: (s.dtype, s.shape, s.tobytes())) if kwargs.get("output_mode") != "coco_rle" else repr
    return [(seg(r["segmentation"]), *(repr(r[k]) for k in sorted(r) if k != "segmentation")) for r in out]


@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_records_equal_upstream(tiny_ref, images, fast_path, crop_n_layers, output_mode):
    sam = copy.deepcopy(tiny_ref)
    options = dict(crop_n_layers=crop_n_layers, output_mode=output_mode)
    for image in images:
        expected = records(sam, image, **options)
        with PATCH.apply(sam):
            got = records(sam, image, **options)
        assert len(expected) > 0 and len(got) == len(expected)
        assert got == expected
    assert fast_path, "the patched path never ran"


def batches(gen: SamAutomaticMaskGenerator, image: np.ndarray, fn) -> list:
    """`fn(gen, points, ...)` on every batch of every crop, as `_process_crop` calls `_process_batch`."""
    out = []
    boxes, layers = generate_crop_boxes(image.shape[:2], gen.crop_n_layers, gen.crop_overlap_ratio)
    for (x0, y0, x1, y1), layer in zip(boxes, layers):
        crop = image[y0:y1, x0:x1]
        gen.predictor.set_image(crop)
        points = gen.point_grids[layer] * np.array(crop.shape[:2])[None, ::-1]
        for start in range(0, len(points), gen.points_per_batch):
            batch = points[start : start + gen.points_per_batch]
            out.append(fn(gen, batch, crop.shape[:2], [x0, y0, x1, y1], image.shape[:2]))
    return out


@pytest.mark.parametrize(
    "filters",
    [
        {},  # tiny's filters
        {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},  # both filters off: every mask upsampled and kept
        {"pred_iou_thresh": 0.99},  # no mask passes: nothing upsampled
        {"stability_score_thresh": 0.99},  # none stable: upstream's float boxes
        {"stability_score_offset": 0.5, "points_per_batch": 7},
    ],
)
def test_batch_mask_data_equals_upstream(tiny_ref, images, filters):
    """Every batch's MaskData: same keys, and per key the same dtype, device and values (RLEs equal)."""
    kwargs = amg.settings("tiny", {"points_per_side": 8, "crop_n_layers": 1}) | filters
    gen = SamAutomaticMaskGenerator(copy.deepcopy(tiny_ref), **kwargs)
    with torch.no_grad():
        expected = batches(gen, images[1], UPSTREAM)
        got = batches(gen, images[1], ap.process_batch)
    for want, have in zip(expected, got, strict=True):
        assert sorted(k for k, _ in have.items()) == sorted(k for k, _ in want.items())
        assert have["rles"] == want["rles"]
        for key in ("iou_preds", "points", "stability_score", "boxes"):
            a, b = have[key], want[key]
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape) and torch.equal(a, b), key


def test_stacked_on_other_patches_their_modules_run(tiny_ref, images, fast_path):
    """With bf16 and sdpa below it, the records equal those of bf16 and sdpa alone: the decoder the generator runs
    is theirs (an fp32 decoder would give other scores)."""
    sam = copy.deepcopy(tiny_ref)
    with apply_patches(sam, ["bf16", "sdpa"]):
        expected = records(sam, images[0], crop_n_layers=1)
    with apply_patches(sam, ["bf16", "sdpa", "amg_postprocess"]):
        got = records(sam, images[0], crop_n_layers=1)
    assert fast_path and len(expected) > 0 and got == expected
    assert got != records(sam, images[0], crop_n_layers=1)  # fp32 again: the bf16 scores were not fp32's


def random_masks(seed: int, b: int, h: int, w: int, p: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=gen) < p  # B, H, W


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(6, 7, 9), (6, 1, 1), (6, 1, 13), (6, 40, 3)])
def test_rles_equal_upstream(seed, shape):
    masks = random_masks(seed, *shape, p=0.5)
    masks[0] = False  # empty: one run of 0s
    masks[1] = True  # full: counts start with 0
    masks[2].view(-1)[0] = True  # first pixel set
    masks[3].view(-1)[0] = False  # first pixel clear
    masks[4] = random_masks(seed, 1, *shape[1:], p=0.02)[0]  # sparse
    out = ap.rles(masks)
    assert out == mask_to_rle_pytorch(masks)
    assert all(type(c) is int for r in out for c in r["counts"])  # python ints, as upstream's
    assert ap.rles(masks[:0]) == mask_to_rle_pytorch(masks[:0]) == []  # no mask at all
    assert ap.rles(masks[1:2]) == [{"size": list(shape[1:]), "counts": [0, shape[1] * shape[2]]}]


def test_undo_restores_the_class_after_the_last_patched_model(tiny_ref, images, fast_path):
    a, b = copy.deepcopy(tiny_ref), copy.deepcopy(tiny_ref)
    undo_a, undo_b = PATCH.apply(a), PATCH.apply(b)
    assert SamAutomaticMaskGenerator._process_batch is ap._process_batch
    undo_a.undo()
    assert not hasattr(a, ap.MARK) and getattr(b, ap.MARK)
    assert SamAutomaticMaskGenerator._process_batch is ap._process_batch  # b is still patched
    records(b, images[0])
    assert fast_path  # b still takes the patched path
    undo_b.undo()
    assert not hasattr(b, ap.MARK)
    assert SamAutomaticMaskGenerator.__dict__["_process_batch"] is UPSTREAM


def test_generator_over_an_unpatched_model_runs_upstream(tiny_ref, images, fast_path):
    patched, plain = copy.deepcopy(tiny_ref), copy.deepcopy(tiny_ref)
    expected = records(plain, images[0])
    with PATCH.apply(patched):
        assert records(plain, images[0]) == expected  # a generator built while another model is patched
        assert fast_path == []
        records(patched, images[0])
        assert fast_path


def test_declared_unfit_for_point_prompts_only():
    assert "only the automatic mask generator" in unavailable(["amg_postprocess"], "cpu", "points")
    assert unavailable(["amg_postprocess"], "cpu", "amg") is None
    assert PATCH.tolerance == ap.EXACT and not PATCH.touches_encoder
