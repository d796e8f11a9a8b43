"""Inputs of the timed encoder parts, shaped as the model's own forward hands them over."""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder


def encoder_tokens(encoder: image_encoder.ImageEncoderViT, batch: int) -> torch.Tensor:
    """Random tokens as the patch embedding gives them to the blocks: (batch, T, T, C), T = img_size / patch size,
    in the dtype and on the device of the encoder's weights."""
    weight = encoder.patch_embed.proj.weight  # C, 3, patch, patch
    side = encoder.img_size // weight.shape[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, side, side, weight.shape[0], generator=gen)  # B, T, T, C
    return x.to(device=weight.device, dtype=weight.dtype)


def attention_input(block: image_encoder.Block, tokens: torch.Tensor) -> torch.Tensor:
    """What `block.attn` receives: the tokens themselves in a global block; in a windowed one, the zero-padded
    windows, (B * windows, window, window, C)."""
    if block.window_size == 0:
        return tokens  # B, T, T, C
    return image_encoder.window_partition(tokens, block.window_size)[0]  # B * windows, w, w, C
