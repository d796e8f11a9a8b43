"""One module per optimization; importing this package registers them all."""

from samrepro.patches import bf16, compile, sdpa, sync_free  # noqa: F401
