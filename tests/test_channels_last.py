"""channels_last: NHWC conv weights and inputs, the same embeddings up to summation order, exact undo."""

from __future__ import annotations

import copy

import torch
from torch import nn

from samrepro.metrics import sqnr_db
from samrepro.registry import apply_patches

X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # preprocessed tiny input


def convs(sam) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in sam.image_encoder.named_modules() if isinstance(m, nn.Conv2d)}


def test_convs_run_nhwc_with_the_same_result(fp32_model):
    sam = copy.deepcopy(fp32_model)
    weights = {n: m.weight for n, m in convs(sam).items()}
    with torch.no_grad():
        ref = sam.image_encoder(X)
        with apply_patches(sam, ["channels_last"]):
            assert len(weights) == 3  # patch embedding and the two neck convs
            assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs(sam).values())
            out = sam.image_encoder(X)
        assert all(convs(sam)[n].weight is w for n, w in weights.items())  # the original Parameters are back
        assert torch.equal(sam.image_encoder(X), ref)
    assert sqnr_db(ref, out) >= 100.0
