"""compile_decoder: compiled predict_masks agrees with eager per image and batched, and undo restores it."""

from __future__ import annotations

import copy

import pytest
import torch

from samrepro import amg, workload
from samrepro.amg_compare import mask_deviation as amg_deviation
from samrepro.metrics import mask_iou
from samrepro.patches.compile_decoder import CompileDecoderConfig
from samrepro.registry import apply_patches
from tests.conftest import make_samples


@pytest.mark.parametrize("stack", [[], ["batched_decoder", "best_mask_only"]])
def test_compiled_decoder_agrees_with_eager(sam, stack):
    samples = make_samples(11, batch_size=3, max_prompts=4, boxes=False, multi_point=False)
    eager_method = sam.mask_decoder.predict_masks
    with apply_patches(sam, stack):
        _, ref = workload.run(sam, samples)
        with apply_patches(sam, ["compile_decoder"]):
            assert sam.mask_decoder.predict_masks is not eager_method
            _, out = workload.run(sam, samples)
    torch._dynamo.reset()
    assert sam.mask_decoder.predict_masks == eager_method  # the bound method is back
    for r, o in zip(ref, out):
        assert mask_iou(o.best, r.best).min().item() > 0.99
        assert (o.iou_pred - r.iou_pred).abs().max().item() < 1e-4


def test_config_refuses_cuda_graphs_for_dynamic_shapes():
    with pytest.raises(ValueError, match="dynamic=True"):
        CompileDecoderConfig(mode="reduce-overhead")
    static = CompileDecoderConfig(mode="reduce-overhead", dynamic=False)
    assert CompileDecoderConfig.from_dict(static.to_dict()) == static
    assert CompileDecoderConfig.from_dict(CompileDecoderConfig().to_dict()) == CompileDecoderConfig()


def test_static_decoder_compiles_once_per_prompt_count(sam):
    """dynamic = false: the generator's fixed batch of prompts compiles once, and agrees with eager."""
    sam.mask_decoder.to(torch.float32)
    embeddings = torch.randn(1, 128, 16, 16)  # 1, C, h, w: the tiny model's embedding
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(torch.rand(6, 1, 2) * 256, torch.ones(6, 1)), boxes=None, masks=None)
        ref = sam.mask_decoder.predict_masks(embeddings, pe, sparse, dense)
        torch._dynamo.reset()
        with apply_patches(sam, ["compile_decoder"], {"compile_decoder": {"dynamic": False}}):
            counts = torch._dynamo.utils.counters
            counts.clear()
            out = [sam.mask_decoder.predict_masks(embeddings, pe, sparse, dense) for _ in range(3)]
            assert counts["stats"]["unique_graphs"] == 1
            sam.mask_decoder.predict_masks(embeddings, pe, sparse[:5], dense[:5])  # another count: compiled anew
            assert counts["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
    for masks, iou in out:  # 6, 4, h, w and 6, 4
        assert (masks - ref[0]).abs().max().item() < 1e-3 and (iou - ref[1]).abs().max().item() < 1e-4


def test_generator_batches_compile_once_and_keep_the_masks(tiny_ref):
    """The AMG plan's static decoder under the official generator: batches of 24, 24 and 16 points per image make two
    graphs however many images follow, and every image's masks are eager's."""
    sam = copy.deepcopy(tiny_ref)  # trained weights where shipped: the generator keeps masks to compare
    samples = make_samples(3, batch_size=2, max_prompts=1, boxes=False, multi_point=False)
    settings = amg.settings("tiny", {"points_per_side": 8, "points_per_batch": 24})  # 64 points: 24 + 24 + 16
    eager = amg.run(sam, samples, settings, warmup=0)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    with apply_patches(sam, ["compile_decoder"], {"compile_decoder": {"dynamic": False}}):
        compiled = amg.run(sam, samples, settings, warmup=0)
    torch._dynamo.reset()
    assert counts["stats"]["unique_graphs"] == 2
    assert eager.masks_per_image > 0 and amg_deviation(eager.masks, compiled.masks)["amg_match_share"] == 1.0
