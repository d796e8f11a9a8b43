"""One module per optimization; importing this package registers them all."""

from samrepro.patches import sync_free  # noqa: F401
