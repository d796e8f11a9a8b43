"""FLOPs of the official image encoder per image, counted by torch's FlopCounterMode on a meta-device model."""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from samrepro.models import build


@functools.cache
def encoder_flops(model: str) -> int:
    """Matmul and conv FLOPs (multiply and add counted apart) of one image through the unpatched encoder, at its
    input size; windowed blocks count their zero-padded tokens, as they compute them (vit_h: 5.961e12)."""
    with torch.device("meta"):
        encoder = build(model).image_encoder
    x = torch.empty(1, 3, encoder.img_size, encoder.img_size, device="meta")  # 1, 3, S, S
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(x)
    return counter.get_total_flops()


def tflop_s(model: str, encoded_images: int, encoder_s: float) -> float | None:
    """Achieved encoder TFLOP/s over a run that encoded `encoded_images` (padding included) in `encoder_s`."""
    return encoder_flops(model) * encoded_images / encoder_s / 1e12 if encoder_s > 0 else None
