"""Inductor knobs that patches applied before `compile` need while the encoder compiles (int8_dynamic's int_mm
fusion, flex_attn's CPU thread pin), per encoder; `compile` holds them in the same per-call scope as its own,
never globally."""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from samrepro.patch import PatchError, Undo

_REQUESTED: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def request_knobs(encoder: nn.Module, knobs: dict[str, Any], undo: Undo) -> None:
    """Have a later `compile` of `encoder` hold `knobs` inside its calls; undone with the requesting patch."""
    held = _REQUESTED.setdefault(encoder, {})
    clash = sorted(k for k, v in knobs.items() if held.get(k, v) != v)
    if clash:
        raise PatchError(f"inductor knobs {clash} were already requested with other values: {held}")
    added = [k for k in knobs if k not in held]
    held.update(knobs)

    def release() -> None:
        for k in added:
            del held[k]

    undo.on_undo(release)


def requested_knobs(encoder: nn.Module) -> dict[str, Any]:
    """The knobs patches have requested for `encoder` so far."""
    return dict(_REQUESTED.get(encoder, {}))
