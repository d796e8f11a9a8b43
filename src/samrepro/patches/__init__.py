"""One module per optimization; importing this package registers them all."""

from samrepro.patches import sdpa, sync_free  # noqa: F401
