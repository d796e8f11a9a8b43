"""Fingerprints of model and process state, to prove that undo is exact."""

from __future__ import annotations

from typing import Any

import torch
from segment_anything.modeling import image_encoder, prompt_encoder, transformer
from torch import nn


def model_state(model: nn.Module) -> dict[str, Any]:
    """Identity and type of every module, parameter and buffer, plus instance attributes."""
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "tensors": [(name, id(t), t.dtype, t.device) for name, t in _tensors(model)],
        "instance_attrs": [(name, sorted(vars(m))) for name, m in model.named_modules()],
    }


def tensors_equal(model: nn.Module, copy: nn.Module) -> list[str]:
    """Names of parameters/buffers whose values differ (torch.equal) between two models."""
    theirs = dict(_tensors(copy))
    return [n for n, t in _tensors(model) if n not in theirs or not torch.equal(t.cpu(), theirs[n].cpu())]


def global_state() -> dict[str, Any]:
    """Process-wide state patches may touch: compiler configs, backends, upstream globals."""
    modules = (image_encoder, prompt_encoder, transformer)
    return {
        "inductor": torch._inductor.config.save_config_portable(),
        "dynamo": torch._dynamo.config.save_config_portable(),
        "sdpa": (
            torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled(),
        ),
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "upstream": {  # dynamo adds __compiled_fn_* globals while compiled code exists; reset() removes them
            (m.__name__, k): id(v)
            for m in modules
            for k, v in vars(m).items()
            if callable(v) and not k.startswith("__")
        },
        "classes": {(m.__name__, k): dict(vars(v)) for m in modules for k, v in vars(m).items() if isinstance(v, type)},
    }


def _tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)
