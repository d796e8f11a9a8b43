"""Register, list, look up and apply patches by name; patches from outside the package register the same way.

Outside patches come from a module that calls `register_patch` when imported, named in an entry point of the
group `samrepro.patches` (an installed package) or in `SAMREPRO_PATCHES` (comma-separated module names, for code on
the path). Both reach every step process, so the runner and the gates treat them as built-in patches.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
from typing import Any

from torch import nn

from samrepro.patch import Handle, Patch, PatchConfig, PatchError

# The order patches are applied in: weight transforms and attention rewrites first,
# `compile` last because it wraps the encoder that the others change.
PATCH_ORDER = (
    "bf16",
    "channels_last",
    "patch_embed_gemm",
    "sync_free",
    "sdpa",
    "triton_attn",
    "flex_attn",
    "fold_attn",
    "batched_decoder",
    "best_mask_only",
    "compile_decoder",
    "amg_postprocess",
    "gelu_epilogue",
    "int8_dynamic",
    "fp8",
    "fp8_fused",
    "sparse24",
    "compile",
)

ENTRY_POINTS = "samrepro.patches"
MODULES_ENV = "SAMREPRO_PATCHES"

_PATCHES: dict[str, Patch] = {}
_ORDER: list[str] = list(PATCH_ORDER)  # the built-ins, and outside patches where they asked to go
_outside_loaded = False


def register_patch(patch: Patch, before: str = "compile") -> Patch:
    """Add a patch to the registry. A built-in takes its place in PATCH_ORDER; any other name is placed just
    before `before` (default `compile`, which wraps the encoder the others change)."""
    if patch.name in _PATCHES:
        raise PatchError(f"a patch named {patch.name!r} is already registered")
    if patch.name not in _ORDER:
        if before not in _ORDER:
            raise PatchError(f"cannot place {patch.name!r} before unknown patch {before!r}; known: {_ORDER}")
        _ORDER.insert(_ORDER.index(before), patch.name)
    _PATCHES[patch.name] = patch
    return patch


def load_outside_patches() -> None:
    """Import the modules that register outside patches, once per process; a module that fails names itself."""
    global _outside_loaded
    if _outside_loaded:
        return
    _outside_loaded = True
    names = [m.strip() for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]
    for module in names:
        try:
            importlib.import_module(module)
        except Exception as e:
            raise PatchError(f"{MODULES_ENV}: module {module!r} failed to import: {type(e).__name__}: {e}") from e
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as e:
            raise PatchError(f"entry point {entry.name!r} ({entry.value}) failed to load: {e}") from e


def list_patches(pattern: str = "*") -> list[str]:
    """Registered patch names matching a shell-style pattern, in application order."""
    load_outside_patches()
    return [n for n in _ORDER if n in _PATCHES and fnmatch.fnmatch(n, pattern)]


def get_patch(name: str) -> Patch:
    load_outside_patches()
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
    return sorted(names, key=_ORDER.index)


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
