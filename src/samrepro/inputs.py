"""The checks that run before any step: names, numbers, device, weights, data and plan configs, each refused with
one line that says what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samrepro import plans
from samrepro.checkpoints import cache_root
from samrepro.models import MODELS, check_checkpoint, sha256, verified_tiny_weights
from samrepro.plans import ResolvedStep
from samrepro.registry import get_patch, list_patches

DEVICES = ("cpu", "cuda")
DEFAULT_BATCH_SIZE = 8  # the points workload's


class UsageError(ValueError):
    """Bad input from the user; the message says what is valid."""


def check_inputs(model: str, device: str, mode: str, batch_size: int, images: int, prompts: int | None) -> None:
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"unknown device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if mode not in plans.MODES:
        raise UsageError(f"unknown mode {mode!r}; valid: {', '.join(plans.MODES)}")
    for name, value in (("batch size", batch_size), ("images", images), ("prompts", prompts)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")


def resolve_workload(
    name: str, model: str, options: dict[str, int], batch_size: int | None, prompts: int | None
) -> tuple[dict[str, Any], int]:
    """The workload a run times, with every setting (workloads.resolve), and the batch size it runs with. AMG
    encodes one image (or crop) at a time from the generator's own grid, so batch size and prompts are refused; the
    interactive workload embeds one image at a time."""
    from samrepro import workloads

    if name == workloads.AMG and (batch_size is not None or prompts is not None):
        what = "--batch-size" if batch_size is not None else "--prompts"
        raise UsageError(
            f"{what} applies to the points workload; --workload amg encodes one image at a time and prompts a grid "
            "(--points-per-side, --points-per-batch)"
        )
    if name == workloads.INTERACTIVE and batch_size is not None:
        raise UsageError(
            "--batch-size applies to the points workload; --workload interactive embeds one image at a time"
        )
    try:
        workload = workloads.resolve(name, model, options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return workload, 1 if name in (workloads.AMG, workloads.INTERACTIVE) else batch_size or DEFAULT_BATCH_SIZE


def check_patches(names: list[str], device: str, workload: str = "points") -> None:
    """Patches asked for by name must exist and run here: an error with the reason (a plan's steps are skipped)."""
    valid = list_patches()
    if not names:
        raise UsageError(f"no patch names given; valid: {', '.join(valid)}")
    for name in names:
        if name not in valid:
            raise UsageError(f"unknown patch {name!r}; valid: {', '.join(valid)}")
        if names.count(name) > 1:
            raise UsageError(f"patch {name!r} is listed twice")
        if reason := get_patch(name).unavailable_reason(device):
            raise UsageError(f"patch {name} cannot run on {device}: {reason}")
        if reason := get_patch(name).workload_reason(workload):
            raise UsageError(f"patch {name} cannot run with --workload {workload}: {reason}")


def resolve_weights(model: str, weights: str | None) -> str | None:
    """None: tiny's shipped weights (hash-checked), the official checkpoint for vit_*; "official" is fetched here,
    once, into the cache; a checkpoint path must fit the model and is made absolute."""
    if weights is None and model != "tiny":
        weights = "official"
    if weights is None:
        try:
            verified_tiny_weights()
        except (OSError, ValueError) as e:
            raise UsageError(f"{e}; pass --weights random or PATH") from None
        return None
    if weights == "random":
        return weights
    if weights == "official":
        from samrepro import checkpoints

        if model not in checkpoints.CHECKPOINTS:
            raise UsageError(f"no official checkpoint for {model}; official: {', '.join(checkpoints.CHECKPOINTS)}")
        try:
            weights = str(checkpoints.resolve(model))  # downloaded once and verified, in the cache
        except checkpoints.DownloadError as e:
            raise UsageError(
                f"cannot download the official {model} checkpoint ({first_line(str(e))}); "
                "for a speed-only measurement without it, pass --weights random"
            ) from None
    path = Path(weights)
    if not path.is_file():
        why = "a folder" if path.is_dir() else "not found"
        raise UsageError(f"weights must be 'random', 'official' or a checkpoint file; {why}: {weights}")
    try:
        check_checkpoint(model, path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return str(path.resolve())


def weights_digest(weights: str | None) -> str | None:
    """SHA-256 of the weights file a run uses (None for seeded random weights)."""
    if weights == "random":
        return None
    return sha256(verified_tiny_weights() if weights is None else Path(weights))


def resolve_data(data: str) -> str:
    """The data spec with an absolute path; a COCO folder is opened and its first image read, here and now."""
    if data == "synthetic":
        return data
    if data == "coco":  # the folder `samrepro data fetch coco` made
        from samrepro.data.coco_fetch import CocoNotFetched, coco_root

        try:
            data = f"coco:{coco_root()}"
        except CocoNotFetched as e:
            raise UsageError(str(e)) from None
    if data.startswith("coco:"):
        root = Path(data[len("coco:") :]).expanduser()
        if not root.is_dir():
            raise UsageError(f"COCO folder not found: {root}")
        spec = f"coco:{root.resolve()}"
        from samrepro import data as datasets

        try:
            datasets.load_dataset(spec, 1, cache_root())
        except Exception as e:  # the data layer's messages name the file; others get their type
            why = str(e) if isinstance(e, OSError | ValueError) else f"{type(e).__name__}: {e}"
            raise UsageError(f"COCO data in {root} is unusable: {first_line(why)}") from None
        return spec
    if data == "noise" or data.startswith("noise:"):
        from samrepro import data as datasets

        try:
            datasets.load_dataset(data, 1, cache_root())
        except ValueError as e:
            raise UsageError(str(e)) from None
        return data if ":" in data else f"noise:{datasets.PROMPTS}"  # one spelling, so plan bounds can match it
    raise UsageError(f"unknown data {data!r}; valid: synthetic, coco (fetched), coco:DIR, noise[:P]")


def unavailable(names: list[str], device: str, workload: str = "points") -> str | None:
    """Why these patches cannot run on `device` (not registered, or the machine lacks what they need), or cannot
    serve `workload`."""
    registered = list_patches()
    missing = [n for n in names if n not in registered]
    if missing:
        return f"patch(es) {', '.join(missing)} not registered (registered: {', '.join(registered)})"
    reasons = [f"{n}: {r}" for n in names if (r := get_patch(n).unavailable_reason(device))]
    reasons += [f"{n} (workload {workload}): {r}" for n in names if (r := get_patch(n).workload_reason(workload))]
    return "; ".join(reasons) or None


def config_error(step: ResolvedStep) -> str | None:
    """Why a step's patch configs are invalid (checked here, so a bad plan fails fast), else None."""
    for name, config in step.configs.items():
        try:
            get_patch(name).config_cls.from_dict(config)
        except (TypeError, ValueError) as e:
            return f"invalid config for {name}: {e}"
    return None


def first_line(text: str) -> str:
    """The first line of an error message, for one-line reports."""
    return (text.strip().splitlines() or [""])[0]
