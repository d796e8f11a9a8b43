"""The patch contract: config, tolerance, requirements, and the undo handle."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class PatchError(RuntimeError):
    """A patch cannot be applied (already applied, wrong order, bad config)."""


class PatchUnavailable(PatchError):
    """A patch cannot run on this machine; the message is the reason."""


AMG_BOUNDS = ("amg_matched_miou_min", "amg_match_share_min")
# An automatic mask can change in two ways where a prompted one changes in one: its shape moves (what point-prompt
# agreement bounds) or it crosses one of the generator's filters (predicted IoU, stability, NMS) and is lost. Where
# a patch declares no AMG bound, each is allowed twice the point-prompt agreement loss (docs/gates.md).
AMG_LOSS_FACTOR = 2.0


def amg_bound(agreement_miou_min: float) -> float:
    """The AMG bounds a patch gets when it declares none: twice its point-prompt agreement loss."""
    return max(0.0, 1.0 - AMG_LOSS_FACTOR * (1.0 - agreement_miou_min))


@dataclass(frozen=True)
class Tolerance:
    """Accuracy bounds against the fp32 model with the same weights on the same inputs."""

    agreement_miou_min: float = 1.0  # mIoU of patched vs fp32 masks (best of 3, threshold 0)
    gt_miou_drop_max: float = 0.0  # absolute mIoU drop against ground truth
    embedding_sqnr_min_db: float = math.inf  # inf: embeddings must be bit-exact
    iou_pred_max_abs: float = 0.0  # largest |difference| of predicted IoU scores
    # Automatic mask generation (docs/gates.md): the mean IoU of each fp32 mask with its best match among the
    # patched run's masks, and the share of fp32 masks matched at IoU >= 0.5. None: derived from agreement_miou_min.
    amg_matched_miou_min: float | None = None
    amg_match_share_min: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.agreement_miou_min <= 1.0:
            raise ValueError(f"agreement_miou_min must be in [0, 1], got {self.agreement_miou_min}")
        if self.gt_miou_drop_max < 0 or self.iou_pred_max_abs < 0:
            raise ValueError("gt_miou_drop_max and iou_pred_max_abs must be >= 0")
        for name in AMG_BOUNDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, amg_bound(self.agreement_miou_min))
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def compose(self, other: Tolerance) -> Tolerance:
        """Tolerance of two patches stacked: their errors add (noise powers for SQNR)."""
        noise = 10 ** (-self.embedding_sqnr_min_db / 10) + 10 ** (-other.embedding_sqnr_min_db / 10)
        return Tolerance(
            agreement_miou_min=max(0.0, self.agreement_miou_min + other.agreement_miou_min - 1.0),
            gt_miou_drop_max=self.gt_miou_drop_max + other.gt_miou_drop_max,
            embedding_sqnr_min_db=math.inf if noise == 0 else -10 * math.log10(noise),
            iou_pred_max_abs=self.iou_pred_max_abs + other.iou_pred_max_abs,
            **{k: max(0.0, getattr(self, k) + getattr(other, k) - 1.0) for k in AMG_BOUNDS},
        )

    def tighten(self, bounds: dict[str, float]) -> Tolerance:
        """This tolerance with `bounds` wherever they demand more; a bound that would loosen it is ignored."""
        stricter = {"agreement_miou_min": max, "embedding_sqnr_min_db": max, "gt_miou_drop_max": min}
        stricter |= dict.fromkeys(AMG_BOUNDS, max)
        return Tolerance(**{
            k: stricter.get(k, min)(v, bounds[k]) if k in bounds else v for k, v in dataclasses.asdict(self).items()
        })  # fmt: skip

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


EXACT = Tolerance()
# The same math in another summation order (compiled kernels, other conv algorithms): the bounds `compile` measured
# with wide margins (see its comment).
REORDERED = Tolerance(
    agreement_miou_min=0.995, gt_miou_drop_max=1e-3, embedding_sqnr_min_db=80.0, iou_pred_max_abs=1e-4
)


@dataclass(frozen=True)
class Requires:
    """What a patch needs from the machine."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    min_capability: tuple[int, int] | None = None  # CUDA compute capability
    packages: tuple[str, ...] = ()

    def unmet(self, device: str | torch.device) -> str | None:
        """Why the patch cannot run on `device`, or None when it can."""
        kind = torch.device(device).type
        if kind not in self.devices:
            return f"needs device {' or '.join(self.devices)}, got {kind}"
        if kind == "cuda" and not torch.cuda.is_available():
            return "CUDA requested but torch.cuda.is_available() is False"
        if kind == "cuda" and self.min_capability is not None:
            cap = torch.cuda.get_device_capability(torch.device(device))
            if cap < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                return f"needs compute capability >= {need}, this GPU is {cap[0]}.{cap[1]}"
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if missing:
            return f"needs the package(s) {', '.join(missing)}"
        return None


@dataclass(frozen=True)
class PatchConfig:
    """Base of every patch's frozen config; subclasses add fields."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


class Undo:
    """Records how to put back everything a patch changes, and does it in reverse."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name`, remembering whether the instance itself held it before."""
        own = _own_attr(obj, name)
        setattr(obj, name, value)
        if own is _MISSING:
            self._steps.append(lambda: delattr(obj, name))
        else:
            self._steps.append(lambda: setattr(obj, name, own))

    def replace_tensors(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Swap every parameter and buffer of `module` for `fn(tensor)`, keeping the originals."""
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for key, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    new = fn(tensor.detach())
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    table[key] = new
                    self._steps.append(lambda t=table, k=key, orig=tensor: t.__setitem__(k, orig))

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._steps.append(fn)

    def run(self) -> None:
        while self._steps:
            self._steps.pop()()


_MISSING = object()


def _own_attr(obj: Any, name: str) -> Any:
    """The value `obj` holds itself (not via its class) under `name`, else _MISSING."""
    if isinstance(obj, nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return table[name]
    if hasattr(obj, "__dict__") and name in vars(obj):
        return vars(obj)[name]
    return _MISSING


# Which patches each live model carries, without storing anything on the model itself.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()
# Per live model, each taken slot (see Patch.slots) and the patch that holds it.
_SLOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def applied_patches(sam: nn.Module) -> list[str]:
    return list(_APPLIED.get(sam, []))


def is_compiled(module: nn.Module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


class Handle:
    """Undoes one or more applied patches, newest first; usable as a context manager."""

    def __init__(self, sam: nn.Module, names: list[str], undos: list[Undo]) -> None:
        self.sam, self.names, self._undos, self.done = sam, names, undos, False

    def undo(self) -> None:
        if self.done:
            raise PatchError(f"patches {self.names} were already undone")
        applied = _APPLIED.get(self.sam, [])
        for name, undo in zip(reversed(self.names), reversed(self._undos)):
            if applied and applied[-1] != name:
                raise PatchError(f"undo {name!r} out of order: undo {applied[-1]!r} first")
            undo.run()
            applied.pop()
        self.done = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


@dataclass(frozen=True)
class Patch:
    """One named, reversible optimization with its declared tolerance."""

    name: str
    summary: str
    config_cls: type[PatchConfig]
    apply_fn: Callable[[nn.Module, Any, Undo], None] = field(repr=False)
    tolerance: Tolerance
    requires: Requires = Requires()
    changes_weights: bool = False
    touches_encoder: bool = True  # must be applied before `compile` wraps the encoder
    compiles: bool = False  # calls torch.compile: the first forward passes compile
    # What of the model the patch takes over whole (e.g. "encoder linear weights"): two patches that name a common
    # slot cannot be stacked, since the later one would undo or silently override the earlier one's change.
    slots: tuple[str, ...] = ()
    # A weight-changing patch's config that makes the same weight change in plain arithmetic, and how far the
    # patch's kernels may stray from it. With random weights, where the declared tolerance (the cost of the weight
    # change on trained weights) means nothing, a step is gated against fp32 with that change instead.
    reference_config: dict[str, Any] | None = None
    reference_tolerance: Tolerance = REORDERED
    # Raised whenever what the patch computes or what its config means changes: every StepResult records the
    # revisions it ran, and a rerun never keeps a result measured with another revision.
    revision: int = 1
    # Workloads (`samrepro ablate --workload`) the patch cannot serve, each with why: (workload, reason) pairs.
    unfit_workloads: tuple[tuple[str, str], ...] = ()

    def unavailable_reason(self, device: str | torch.device) -> str | None:
        return self.requires.unmet(device)

    def workload_reason(self, workload: str) -> str | None:
        """Why the patch cannot serve `workload`, or None when it can."""
        return dict(self.unfit_workloads).get(workload)

    def can_run(self, device: str | torch.device) -> bool:
        return self.unavailable_reason(device) is None

    def apply(self, sam: nn.Module, config: PatchConfig | None = None) -> Handle:
        config = self.config_cls() if config is None else config
        if not isinstance(config, self.config_cls):
            raise PatchError(f"{self.name} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        device = next(sam.parameters()).device
        reason = self.unavailable_reason(device)
        if reason:
            raise PatchUnavailable(f"{self.name}: {reason}")
        applied = _APPLIED.setdefault(sam, [])
        if self.name in applied:
            raise PatchError(f"{self.name} is already applied to this model")
        held = _SLOTS.setdefault(sam, {})
        taken = [slot for slot in self.slots if slot in held]
        if taken:
            raise PatchError(f"{self.name} cannot be stacked on {held[taken[0]]}: both take the slot {taken[0]!r}")
        if self.touches_encoder and is_compiled(sam.image_encoder):
            raise PatchError(
                f"{self.name} changes the image encoder, which `compile` has already wrapped: "
                "apply it before compile (apply_patches orders them for you)"
            )
        undo = Undo()
        try:
            self.apply_fn(sam, config, undo)
        except BaseException:
            undo.run()
            raise
        for slot in self.slots:
            held[slot] = self.name
            undo.on_undo(lambda slot=slot: held.pop(slot))
        applied.append(self.name)
        return Handle(sam, [self.name], [undo])
