"""Which registered patches each microbenchmark runs: those that can run on the device and change the part timed.

Linear-weight patches declare it (the encoder-linear-weights slot). Attention patches do not, so they are found by
effect: each patch that can run on the device is applied to the tiny model there, and the benchmark takes it where it
rebinds (or replaces) an attention module of the part timed. Patches registered from outside are found the same way.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from segment_anything.modeling import Sam, image_encoder, transformer
from torch import nn

import samrepro
from samrepro.patches._weights import WEIGHTS_SLOT

UPSTREAM = "upstream"  # the unpatched model: the row every variant is read against
BLOCK_KINDS = ("windowed", "global")


def device_available(device: str) -> bool:
    return device == "cpu" or torch.cuda.is_available()


def runnable(device: str) -> list[str]:
    """Registered patches whose requirements this machine meets on `device`, in application order."""
    if not device_available(device):
        return []
    return [name for name in samrepro.list_patches() if samrepro.get_patch(name).can_run(device)]


def block_of_kind(encoder: image_encoder.ImageEncoderViT, kind: str) -> image_encoder.Block:
    """The first windowed (window_size > 0) or global (window_size 0) block of the encoder."""
    return next(b for b in encoder.blocks if (b.window_size > 0) == (kind == "windowed"))


def encoder_attention_patches(device: str, kind: str) -> list[str]:
    """Patches that rebind the attention of the encoder's `kind` blocks (fold_attn, by default, the global ones)."""
    return _attention_effects(device)[kind]


def decoder_attention_patches(device: str) -> list[str]:
    """Patches that rebind the mask decoder's attention modules."""
    return _attention_effects(device)["decoder"]


def linear_weight_patches(device: str) -> list[str]:
    """Patches that take over the encoder Linears (int8_dynamic, fp8, fp8_fused, sparse24, gelu_epilogue)."""
    return [name for name in runnable(device) if WEIGHTS_SLOT in samrepro.get_patch(name).slots]


@functools.cache
def _attention_effects(device: str) -> dict[str, list[str]]:
    """Part ("windowed", "global", "decoder") -> the patches that rebind its attention, found on the tiny model."""
    effects: dict[str, list[str]] = {"windowed": [], "global": [], "decoder": []}
    if not device_available(device):
        return effects
    sam = samrepro.load_model("tiny", device)
    for name in runnable(device):
        before = _attention_modules(sam)
        with samrepro.apply_patches(sam, [name]):
            after = _attention_modules(sam)
            for part in effects:
                if any(new is not old or "forward" in vars(new) for old, new in zip(before[part], after[part])):
                    effects[part].append(name)
    return effects


def _attention_modules(sam: Sam) -> dict[str, list[nn.Module]]:
    encoder = sam.image_encoder
    decoder = [m for m in sam.mask_decoder.modules() if isinstance(m, transformer.Attention)]
    return {kind: [block_of_kind(encoder, kind).attn] for kind in BLOCK_KINDS} | {"decoder": decoder}


def patched(sam: Sam, variant: str) -> contextlib.AbstractContextManager:
    """The model with one patch applied for the block's duration (undone after), or as it is for UPSTREAM."""
    return contextlib.nullcontext() if variant == UPSTREAM else samrepro.apply_patches(sam, [variant])
