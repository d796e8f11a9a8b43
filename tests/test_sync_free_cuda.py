"""On a GPU, sync_free leaves no synchronising call in encoder + predict_torch."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything import SamPredictor

from samrepro import apply_patches
from samrepro.workload import preprocess, prompt_tensors
from tests.conftest import make_samples

pytestmark = pytest.mark.cuda


def encode_and_predict(sam) -> None:
    """Encoder + predict_torch with every input already on the device."""
    device = next(sam.parameters()).device
    (sample,) = make_samples(seed=1, batch_size=1, max_prompts=4, boxes=False, multi_point=True)
    x, input_sizes, original_sizes = preprocess(sam, [sample], device)
    predictor = SamPredictor(sam)
    prompts = prompt_tensors(predictor, sample, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        predictor.features = sam.image_encoder(x)
        predictor.input_size, predictor.original_size = input_sizes[0], original_sizes[0]
        predictor.is_image_set = True
        predictor.predict_torch(**prompts, multimask_output=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def cuda_tiny(device, tiny_ref):
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda")
    return copy.deepcopy(tiny_ref)


def test_official_model_synchronises(cuda_tiny):
    with pytest.raises(RuntimeError, match="synchroniz"):
        encode_and_predict(cuda_tiny)


def test_sync_free_has_no_synchronising_call(cuda_tiny):
    with apply_patches(cuda_tiny, ["sync_free"]):
        encode_and_predict(cuda_tiny)
