"""compile_decoder: `torch.compile` of the mask decoder's mask prediction (issue #7, "the decoder path").

The H100 profile of vit_b at batch 16 x 8 prompts (reports/h100-session3) showed the eager decoder spending at
least 9 ms of its ~23 ms per batch in unfused elementwise passes over (128, 4096, 256) activations: copies for
permutes, positional-encoding adds, layer norms. Inductor fuses those. `predict_masks` is compiled as it stands
when applied (upstream's, or batched_decoder's per-prompt version), without CUDA graphs: the number of prompts
changes between calls, and after one recompile dynamo treats it as dynamic. Not yet measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam

from samrepro.patch import REORDERED, Patch, PatchConfig, Undo
from samrepro.registry import register_patch


@dataclass(frozen=True)
class CompileDecoderConfig(PatchConfig):
    """mode: a torch.compile mode without CUDA graphs ("default" or "max-autotune-no-cudagraphs")."""

    mode: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in ("default", "max-autotune-no-cudagraphs"):
            raise ValueError(f"mode must be 'default' or 'max-autotune-no-cudagraphs', got {self.mode!r}")


def _apply(sam: Sam, config: CompileDecoderConfig, undo: Undo) -> None:
    decoder = sam.mask_decoder
    compiled = torch.compile(decoder.predict_masks, mode=config.mode, dynamic=None)
    undo.setattr(decoder, "predict_masks", compiled)


PATCH = register_patch(
    Patch(
        name="compile_decoder",
        summary="torch.compile of the mask decoder's predict_masks (no CUDA graphs; prompt count dynamic)",
        config_cls=CompileDecoderConfig,
        apply_fn=_apply,
        # As `compile` (reassociation only); the encoder is untouched, so its embeddings stay exact.
        tolerance=dataclasses.replace(REORDERED, embedding_sqnr_min_db=math.inf),
        touches_encoder=False,
    )
)
