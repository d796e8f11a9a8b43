"""Register, list, look up and apply patches by name."""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from samrepro.patch import Handle, Patch, PatchConfig, PatchError

# The order patches are applied in: weight transforms and attention rewrites first,
# `compile` last because it wraps the encoder that the others change.
PATCH_ORDER = (
    "bf16",
    "channels_last",
    "sync_free",
    "sdpa",
    "triton_attn",
    "flex_attn",
    "fold_attn",
    "batched_decoder",
    "best_mask_only",
    "compile_decoder",
    "int8_dynamic",
    "fp8",
    "fp8_fused",
    "sparse24",
    "compile",
)

_PATCHES: dict[str, Patch] = {}


def register_patch(patch: Patch) -> Patch:
    if patch.name in _PATCHES:
        raise PatchError(f"a patch named {patch.name!r} is already registered")
    if patch.name not in PATCH_ORDER:
        raise PatchError(f"{patch.name!r} has no place in PATCH_ORDER; add it there")
    _PATCHES[patch.name] = patch
    return patch


def list_patches(pattern: str = "*") -> list[str]:
    """Registered patch names matching a shell-style pattern, in application order."""
    return [n for n in PATCH_ORDER if n in _PATCHES and fnmatch.fnmatch(n, pattern)]


def get_patch(name: str) -> Patch:
    try:
        return _PATCHES[name]
    except KeyError:
        raise KeyError(f"unknown patch {name!r}; valid: {', '.join(list_patches())}") from None


def ordered(names: list[str]) -> list[str]:
    """Names sorted into PATCH_ORDER; unknown names raise with the valid list."""
    for name in names:
        get_patch(name)
    if len(set(names)) != len(names):
        raise PatchError(f"a patch is listed twice in {names}")
    return sorted(names, key=PATCH_ORDER.index)


def apply_patches(
    sam: nn.Module, names: list[str], configs: dict[str, dict[str, Any] | PatchConfig] | None = None
) -> Handle:
    """Apply several patches in PATCH_ORDER; the returned handle undoes them in reverse."""
    configs = configs or {}
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise PatchError(f"configs given for patches not in the list: {unknown}")
    handles: list[Handle] = []
    try:
        for name in ordered(names):
            patch = get_patch(name)
            cfg = configs.get(name)
            if isinstance(cfg, dict):
                cfg = patch.config_cls.from_dict(cfg)
            handles.append(patch.apply(sam, cfg))
    except BaseException:
        for handle in reversed(handles):
            handle.undo()
        raise
    return Handle(sam, [n for h in handles for n in h.names], [u for h in handles for u in h._undos])
