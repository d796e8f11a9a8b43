"""The equivalence gates: accuracy within tolerance, and an undo that leaves no trace."""

from __future__ import annotations

import copy
from typing import Any

import torch
from segment_anything.modeling import Sam

from samrepro import amg, snapshot, workload
from samrepro.amg_compare import AmgOutputs, gated
from samrepro.amg_compare import deviation as amg_deviation
from samrepro.equivalence import compare
from samrepro.metrics import check_tolerance
from samrepro.patch import Patch, Tolerance
from samrepro.registry import get_patch, ordered
from samrepro.workload import Sample


def plan_tolerance(
    patches: list[Patch], bound: dict[str, float] | None = None, plainly: str | None = None
) -> Tolerance:
    """The tolerance of several patches stacked: each one's errors add up (`Tolerance.compose`), and a plan `bound`
    can only demand more. `plainly` names a weight-changing patch whose change the reference makes too (random
    weights, `Patch.reference_config`): only its kernels' reordering then counts against it."""
    tol = Tolerance()
    for patch in patches:
        tol = tol.compose(patch.reference_tolerance if patch.name == plainly else patch.tolerance)
    return tol.tighten(bound or {})


def check(
    measured: dict[str, float | None],
    patches: list[Patch],
    bound: dict[str, float] | None = None,
    plainly: str | None = None,
    measures: tuple[str, ...] | None = None,
) -> tuple[Tolerance, list[str]]:
    """The gate: the tolerance `patches` are held to and the violations of it by `measured` (a `deviation`,
    restricted to `measures` when given; AMG matched measures only over enough fp32 masks, `amg_compare.gated`).
    The runner's steps and the equivalence tests both decide here."""
    tol = plan_tolerance(patches, bound, plainly)
    checked = measured if measures is None else {k: measured[k] for k in measures}
    return tol, check_tolerance(gated(checked), tol)


# Per-mask measures are statistics over prompts: a handful of prompts (one best-of-3 flip) says little, so the
# hypothesis gate checks only the per-tensor measures and the fixed validation subset checks all of them.
TENSOR_MEASURES = ("embedding_sqnr_db", "iou_pred_max_abs")


def accuracy_violations(
    ref: Sam,
    patches: list[Patch],
    samples: list[Sample],
    measures: tuple[str, ...] | None = None,
    batch_size: int | None = None,
) -> tuple[list[str], dict]:
    """Apply `patches` to a copy of the fp32 model `ref`; violations of their composed tolerance
    (restricted to `measures` when given)."""
    patched = copy.deepcopy(ref)
    handles = [p.apply(patched) for p in patches]
    try:
        measured = compare(ref, patched, samples, batch_size)
    finally:
        for h in reversed(handles):
            h.undo()
    return check(measured, patches, measures=measures)[1], measured


def amg_violations(
    ref: Sam, patches: list[Patch], samples: list[Sample], settings: dict[str, Any]
) -> tuple[list[str], dict]:
    """The AMG gate: the generator (keyword arguments `settings`) on `ref`, the fp32 model, and on a copy of it
    with `patches` applied; violations of their composed AMG tolerance, and what was measured."""
    patched = copy.deepcopy(ref)
    handles = [p.apply(patched) for p in patches]
    try:
        runs = [AmgOutputs.of_run(amg.run(sam, samples, settings, warmup=0)) for sam in (ref, patched)]
    finally:
        for h in reversed(handles):
            h.undo()
    measured = amg_deviation(*runs)
    return check(measured, patches)[1], measured


def undo_violations(sam: Sam, patches: list[Patch], samples: list[Sample]) -> list[str]:
    """Apply, run, undo: everything the model and the process hold must be as before, outputs identical."""
    pristine = copy.deepcopy(sam)
    state, globals_before = snapshot.model_state(sam), snapshot.global_state()
    emb_before, preds_before = workload.run(sam, samples)
    handles = [p.apply(sam) for p in patches]
    workload.run(sam, samples)
    for h in reversed(handles):
        h.undo()
    out = []
    if snapshot.model_state(sam) != state:
        out.append("module objects, tensor objects or instance attributes changed")
    changed = snapshot.tensors_equal(sam, pristine)
    if changed:
        out.append(f"tensor values changed: {changed[:5]}")
    diff = [k for k, v in snapshot.global_state().items() if globals_before[k] != v]
    if diff:
        out.append(f"global state changed: {diff}")
    emb_after, preds_after = workload.run(sam, samples)
    same = torch.equal(emb_before, emb_after) and all(
        torch.equal(a.masks, b.masks) and torch.equal(a.iou_pred, b.iou_pred) for a, b in zip(preds_before, preds_after)
    )
    if not same:
        out.append("outputs after undo differ from outputs before apply")
    return out


def patches_for(names: list[str]) -> list[Patch]:
    return [get_patch(n) for n in ordered(names)]
