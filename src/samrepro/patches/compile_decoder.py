"""compile_decoder: `torch.compile` of the mask decoder's mask prediction (beyond the blog: the decoder path).

The H100 profile of vit_b at batch 16 x 8 prompts (reports/2026-11-21-h100-attention-sweep-profiled-waterfalls)
showed the eager decoder spending at least 9 ms of its ~23 ms per batch in unfused elementwise passes over
(128, 4096, 256) activations: copies for permutes, positional-encoding adds, layer norms. Inductor fuses those.
`predict_masks` is compiled as it stands when applied (upstream's, or batched_decoder's per-prompt version), without
CUDA graphs and with dynamic shapes from the first call: the number of prompts changes between batches, and with
dynamo's default (static, then dynamic after a recompile) that recompile landed inside the timed loop (tiny, CPU,
bs8 synthetic: 77.9 -> 14.3 img/s).
Dynamic from the start, the same run gave 71.5 -> 72.1 img/s (p50 13.7 -> 14.0 ms): no gain on the tiny on a CPU.
On an H100 (bs16, random weights, stacked on beyond.toml's best_mask_only step), vit_b: 202.8 -> 237.8 img/s at 8
prompts per image, 70.2 -> 118.6 at 64; vit_h: 49.6 -> 51.3 at 8
(reports/2026-11-21-h100-decoder-compile-fp8-fix-and-peer).
The automatic mask generator calls the decoder with `points_per_batch` prompts every time (the last batch of a grid
that does not divide evenly once more), so there `dynamic = false` compiles for that fixed shape, and only then may
the mode be "reduce-overhead": one CUDA graph per shape replays the decoder's launches.
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
    """mode: a torch.compile mode; with CUDA graphs ("reduce-overhead") only for static shapes (dynamic = false)."""

    mode: str = "default"
    dynamic: bool = True

    def __post_init__(self) -> None:
        modes = ("default", "max-autotune-no-cudagraphs") + (() if self.dynamic else ("reduce-overhead",))
        if self.mode not in modes:
            raise ValueError(
                f"mode must be one of {', '.join(map(repr, modes))} (dynamic={self.dynamic}), got {self.mode!r}"
            )


def _apply(sam: Sam, config: CompileDecoderConfig, undo: Undo) -> None:
    decoder = sam.mask_decoder
    compiled = torch.compile(decoder.predict_masks, mode=config.mode, dynamic=config.dynamic)
    undo.setattr(decoder, "predict_masks", compiled)


PATCH = register_patch(
    Patch(
        name="compile_decoder",
        summary="torch.compile of the mask decoder's predict_masks (dynamic shapes, or static with CUDA graphs)",
        config_cls=CompileDecoderConfig,
        compiles=True,
        apply_fn=_apply,
        # As `compile` (reassociation only); the encoder is untouched, so its embeddings stay exact.
        tolerance=dataclasses.replace(REORDERED, embedding_sqnr_min_db=math.inf),
        touches_encoder=False,
    )
)
