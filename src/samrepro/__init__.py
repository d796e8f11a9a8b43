"""samrepro: the Segment Anything, Fast optimizations as reversible, accuracy-gated patches."""

from samrepro import patches  # noqa: F401  (registers every patch)
from samrepro.models import load_model
from samrepro.patch import Handle, Patch, PatchError, PatchUnavailable, Tolerance
from samrepro.registry import apply_patches, get_patch, list_patches

__all__ = [
    "Handle",
    "Patch",
    "PatchError",
    "PatchUnavailable",
    "Tolerance",
    "apply_patches",
    "get_patch",
    "list_patches",
    "load_model",
]
