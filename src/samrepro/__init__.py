"""samrepro: the Segment Anything, Fast optimizations as reversible, accuracy-gated patches."""

import os

# The user's inductor cache, read before anything imports torchao, which sets inductor's default into the environment.
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

from samrepro import patches  # noqa: E402, F401  (registers every patch)
from samrepro.models import load_model  # noqa: E402
from samrepro.patch import Handle, Patch, PatchError, PatchUnavailable, Tolerance  # noqa: E402
from samrepro.registry import apply_patches, get_patch, list_patches  # noqa: E402

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
