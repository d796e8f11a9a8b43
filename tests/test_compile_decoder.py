"""compile_decoder: compiled predict_masks agrees with eager per image and batched, and undo restores it."""

from __future__ import annotations

import pytest
import torch

from samrepro import workload
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


def test_config_refuses_cuda_graph_modes():
    with pytest.raises(ValueError, match="default"):
        CompileDecoderConfig(mode="reduce-overhead")
    assert CompileDecoderConfig.from_dict(CompileDecoderConfig().to_dict()) == CompileDecoderConfig()
