"""Inductor's persistent-reduction limit, raised for rows reduced along their last dimension.

Inductor reduces a row in one pass, holding it in registers (a persistent reduction), only when it has at most
1,024 elements; longer rows loop over it twice (statistics, then the normalized output). vit_h's LayerNorms run over
1,280 channels, so every add + LayerNorm kernel of its encoder takes the two-pass form; inductor's multi-kernel
reductions, which pick the persistent form there, halved the global blocks' LayerNorms
(reports/2026-11-22-h100-fp8-norm-fusion-and-peer) but break inductor's FX graph cache on torch 2.11. This raises
the limit through inductor's documented heuristics hook (`InductorChoices`) instead, for the encoder's compile only.
"""

from __future__ import annotations

import functools
from typing import Any

import sympy
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

INDUCTOR_LIMIT = 1024  # inductor's own limit for inner (row) reductions, torch 2.11 (choices.py)


class PersistentRows(InductorChoices):
    """Inductor's heuristics, but row reductions of up to `limit` elements run persistent."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def should_use_persistent_reduction(self, features: Any, cooperative_reduction: bool) -> bool:  # type: ignore[override]
        numel = sympy.sympify(features.reduction_numel)
        inner = features.get_reduction_hint() == ReductionHint.INNER
        if inner and not cooperative_reduction and numel.is_number and int(numel) <= self.limit:
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


def choices_class(limit: int) -> functools.partial[PersistentRows]:
    """inductor's `inductor_choices_class` knob for `limit`: a picklable factory, so the FX graph cache keys on it."""
    return functools.partial(PersistentRows, limit)
