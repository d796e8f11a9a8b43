"""compile: `torch.compile` of the image encoder, with the seeds' inductor knobs scoped to its calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.virtualized import V

from samrepro.patch import REORDERED, Patch, PatchConfig, PatchError, Undo
from samrepro.patches._knobs import requested_knobs
from samrepro.patches._persistent import INDUCTOR_LIMIT, choices_class
from samrepro.registry import register_patch

# The extra knobs of the torchao SAM tutorial ("general purpose optimizations"), as fields. They default to
# inductor's own values, as segment-anything-fast ran its published rows; a plan opts in (ablations/blog-tuned.toml).
# `force_fuse_int_mm_with_mul` belongs to int8_dynamic; a dynamo recompile limit is not needed because the
# workload pads batches to one static shape.
SEED_KNOBS = ("epilogue_fusion", "coordinate_descent_tuning", "coordinate_descent_check_all_directions")
CHOICES = "inductor_choices_class"  # inductor's heuristics hook; in the FX graph cache's key, unlike V.choices


@dataclass(frozen=True)
class CompileConfig(PatchConfig):
    """How the encoder is compiled; the inductor knobs hold only inside the encoder's calls."""

    mode: str = "max-autotune"  # a torch.compile mode; max-autotune turns on CUDA graphs on GPU
    fullgraph: bool = True  # a graph break in the encoder is a bug, not a fallback
    dynamic: bool | None = False  # static shapes, as SAF (the workload pads the last batch)
    epilogue_fusion: bool = True  # tutorial: False, since autotuning can be misled by fused epilogues
    coordinate_descent_tuning: bool = False  # tutorial: True, tune Triton block sizes beyond the heuristics
    coordinate_descent_check_all_directions: bool = False  # tutorial: True, widen that search
    persistent_rows: int = INDUCTOR_LIMIT  # rows of up to this many elements reduced in one pass (_persistent.py)
    inductor_options: dict[str, Any] = field(default_factory=dict)  # more torch._inductor.config keys
    clone_output: bool = True  # copy the output out of the CUDA-graph pool (see _scoped_call)

    def __post_init__(self) -> None:
        modes = sorted(set(torch._inductor.list_mode_options()) | {"default"})
        if self.mode not in modes:
            raise ValueError(f"compile mode must be one of {modes}, got {self.mode!r}")
        for name in ("fullgraph", "clone_output", *SEED_KNOBS):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        rows = self.persistent_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < INDUCTOR_LIMIT:
            raise ValueError(f"persistent_rows must be an int, at least inductor's {INDUCTOR_LIMIT}, got {rows!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise ValueError(f"dynamic must be True, False or None, got {self.dynamic!r}")
        if not isinstance(self.inductor_options, dict):
            raise ValueError(f"inductor_options must be a dict, got {type(self.inductor_options).__name__}")
        known = inductor_config.get_config_copy()
        unknown = sorted(k for k in self.inductor_options if k not in known)
        if unknown:
            raise ValueError(f"inductor_options: {unknown} are not torch._inductor.config options")
        doubled = sorted(set(self.inductor_options) & set(SEED_KNOBS))
        if doubled:
            raise ValueError(f"inductor_options: set {doubled} through the config fields of the same name")
        if CHOICES in self.inductor_options:
            raise ValueError(f"inductor_options: {CHOICES} is compile's own (persistent_rows)")

    def inductor_patch(self) -> dict[str, Any]:
        """The torch._inductor.config values that hold while the compiled encoder runs."""
        knobs = {**{k: getattr(self, k) for k in SEED_KNOBS}, **self.inductor_options}
        if self.persistent_rows > INDUCTOR_LIMIT:
            knobs[CHOICES] = choices_class(self.persistent_rows)
        return knobs

    def compile_options(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """torch.compile `options`: the mode's settings, then `knobs` over them.

        Handing torch.compile a `mode` would let the mode win: max-autotune turns coordinate-descent tuning on
        inside the compiler whatever the surrounding config says, and that search is most of its compile time.
        """
        return {**torch._inductor.list_mode_options(self.mode), **knobs}

    def uses_cudagraphs(self) -> bool:
        """Whether inductor will wrap the compiled graph in CUDA graphs (on CUDA inputs)."""
        key = "triton.cudagraphs"
        default = self.inductor_options.get(key, inductor_config.get_config_copy()[key])
        return bool(torch._inductor.list_mode_options(self.mode).get(key, default))


def _scoped_call(call: Callable[..., Any], knobs: dict[str, Any], clone: bool) -> Callable[..., Any]:
    """`call` run inside `inductor_config.patch(knobs)`.

    Compilation happens at the first call (and at every recompile), so the knobs have to
    wrap the calls, not `apply`; outside a call the global config is never touched.

    With CUDA graphs the output lives in the graph's memory pool. A steady-state replay hands
    back the very same tensor refilled (cudagraph_trees.reconstruct_outputs), so an embedding
    kept from an earlier call silently becomes the newest one; only outputs of warm-up and
    recording runs raise on access. `workload.run` consumes the embedding before the next
    encoder call, but a drop-in Sam must let callers keep it (embed two images, then prompt
    both), so it is cloned: one (B, 256, 64, 64) copy, microseconds against a vit_b encoder's
    tens of ms. `cudagraph_mark_step_begin()` would not help (it only permits the overwrite).
    """

    # inductor builds its heuristics handler once per thread, at its first compile: the knob alone would come too
    # late when another graph compiled earlier in the process, so this call's handler is swapped in as well
    choices = knobs.get(CHOICES)
    handler = choices() if choices is not None else None

    def scoped(*args: Any, **kwargs: Any) -> Any:
        swap = V.set_choices_handler(handler) if handler is not None else contextlib.nullcontext()
        with inductor_config.patch(knobs), swap:
            out = call(*args, **kwargs)
        if clone and isinstance(out, torch.Tensor) and out.is_cuda:
            out = out.clone()
        return out

    return scoped  # no functools.wraps: it would copy dynamo's `_torchdynamo_orig_callable` marker


def knobs_for(encoder: nn.Module, config: CompileConfig) -> dict[str, Any]:
    """compile's own knobs plus those requested for `encoder`; a contradiction raises."""
    own, requested = config.inductor_patch(), requested_knobs(encoder)
    clash = sorted(k for k in requested if k in own and own[k] != requested[k])
    if clash:
        raise PatchError(
            f"compile config sets {clash} to {[own[k] for k in clash]}, an applied patch needs {requested}"
        )
    return {**own, **requested}


def _apply(sam: nn.Module, config: CompileConfig, undo: Undo) -> None:
    encoder = sam.image_encoder
    knobs = knobs_for(encoder, config)
    options = config.compile_options(knobs)
    compiled = torch.compile(encoder, options=options, fullgraph=config.fullgraph, dynamic=config.dynamic)
    # OptimizedModule stores its dynamo-wrapped callable as an instance `forward`; wrap that one.
    compiled.forward = _scoped_call(compiled.forward, knobs, config.clone_output and config.uses_cudagraphs())
    undo.on_undo(_drop_compiled_state)  # runs after the original encoder is back in place
    undo.setattr(sam, "image_encoder", compiled)


def _drop_compiled_state() -> None:
    """Forget compiled graphs, guards and CUDA-graph pools (process-wide, as in a fresh process)."""
    torch._dynamo.reset()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


PATCH = register_patch(
    Patch(
        name="compile",
        summary="torch.compile of the image encoder (default max-autotune), inductor knobs scoped to its calls",
        config_cls=CompileConfig,
        compiles=True,
        apply_fn=_apply,
        # Measured (tiny, random weights seeds 0-2, fp32, TF32 off, torch 2.11; CPU C++ and H200 Triton,
        # modes default and max-autotune): embedding SQNR 122.7-124.5 dB, mask agreement >= 0.9999984,
        # |d iou_pred| <= 7.2e-7. Only reassociation differs from eager; bounds leave room for deeper
        # encoders (vit_h has 32 blocks to the tiny's 6) and for masks whose logits sit at the threshold.
        tolerance=REORDERED,
        touches_encoder=True,  # wraps the encoder: refuses an encoder that is already compiled
    )
)
