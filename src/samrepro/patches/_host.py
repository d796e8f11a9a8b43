"""Originals a patch replaced, kept for undo in host memory, so a GPU model holds only what the patch made."""

from __future__ import annotations

import torch

from samrepro.patch import Undo


def park_on_host(tensors: list[torch.Tensor], undo: Undo) -> None:
    """Move the originals kept for undo to host memory (same tensor objects, values copied exactly), as SAF's
    `.to(bf16)` and quantized models held only their new weights; undo moves them back."""
    for t in tensors:
        if t.device.type != "cpu":
            device = t.device
            t.data = t.data.to("cpu")
            undo.on_undo(lambda t=t, device=device: setattr(t, "data", t.data.to(device)))
