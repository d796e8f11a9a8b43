"""One module per optimization; importing this package registers them all."""

from samrepro.patches import batched_decoder, bf16, compile, sdpa, sync_free, triton_attn  # noqa: F401
