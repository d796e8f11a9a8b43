"""What the encoder-Linear weight patches (int8_dynamic, fp8, fp8_fused, sparse24) share: their slot and helpers."""

from __future__ import annotations

from segment_anything.modeling import Sam
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from samrepro.kernels import COUNTERS
from samrepro.patch import PatchError, Undo
from samrepro.patches._host import park_on_host

# Each replaces the encoder Linear weights, so at most one of them applies (the blog runs sparse24 instead of int8).
WEIGHTS_SLOT = "encoder linear weights"


def encoder_linears(sam: Sam) -> dict[str, nn.Linear]:
    """The image encoder's nn.Linear layers by name."""
    return {n: m for n, m in sam.image_encoder.named_modules() if isinstance(m, nn.Linear)}


def require_multiples(linears: dict[str, nn.Linear], multiple: int, patch: str, op: str) -> None:
    """Refuse Linears whose in/out features are not multiples of `multiple`, as `op` needs."""
    fits = {n: m.in_features % multiple == 0 and m.out_features % multiple == 0 for n, m in linears.items()}
    unfit = [f"{n} {tuple(m.weight.shape)}" for n, m in linears.items() if not fits[n]]
    if unfit:
        raise PatchError(f"{patch}: Linear dims must be multiples of {multiple} for {op}, not {unfit}")


def quantize_reversibly(linears: dict[str, nn.Linear], ao_config, patch: str, undo: Undo) -> None:
    """torchao `quantize_` on each Linear; first records what it rebinds (the weight Parameter, the instance
    `extra_repr`), and raises if it left a weight unquantized (torchao skips shapes it cannot take silently).
    The replaced weights wait on the host, as SAF's model held only the quantized ones."""
    from torchao.quantization import quantize_

    replaced = [linear.weight for linear in linears.values()]
    for name, linear in linears.items():
        for attr in ("weight", "extra_repr"):
            undo.setattr(linear, attr, getattr(linear, attr))  # no change now; undo puts this object back
        quantize_(linear, ao_config)
        if not is_traceable_wrapper_subclass(linear.weight):
            raise PatchError(f"{patch}: torchao left {name}.weight {tuple(linear.weight.shape)} unquantized")
    park_on_host(replaced, undo)
    COUNTERS[f"{patch}.layers"] = COUNTERS.get(f"{patch}.layers", 0) + len(linears)
