"""One module per optimization; importing this package registers them all."""

# ruff: noqa: F401
from samrepro.patches import batched_decoder
from samrepro.patches import bf16
from samrepro.patches import compile
from samrepro.patches import sdpa
from samrepro.patches import sync_free
from samrepro.patches import triton_attn
