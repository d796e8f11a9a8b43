"""segment-anything-fast (SAF) as a contender: its package imported from a checkout, its fast model on the same
weights, and the driver that feeds it as its own benchmark does.

SAF's import name is `segment_anything_fast` at every commit, so it cannot clash with the official
`segment_anything`; `import_checkout` makes sure the checkout runs, not an installed copy, and takes its root off
sys.path again (it also holds `experiments/`, `test/`, `setup.py`).
Differences that stay, from SAF's own protocol (experiments/eval_combo.py, data.py):
- SAF gets the image batch and prompt coordinates in bf16 before the clock starts; samrepro's bf16 keeps coords fp32.
- SAF's nested decoder computes and upsamples 4 masks per prompt; the best of masks 1..3 is kept, as for the others
  (SAF's benchmark took the best of all 4).
- SAF's flash_4 kernel autotunes during the warm-up on non-A100 GPUs and pickles its choice into the cwd, so every
  contender runs in a temporary cwd; `--saf-configs-dir` keeps SAF's (device.sh carries it between calls through
  `.peer/saf_configs/`), and the JSON says whether that file was there (flash_4 still autotunes shapes it lacks)
  and which launch the file held for each shape after the run (SAF's throughput moves with that choice).
  The warm-up is never timed.
- SAF's int8 step needs `apply_dynamic_quant`, gone from torchao 0.18.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from segment_anything import SamPredictor

from samrepro import load_model
from samrepro.bench import prepare
from samrepro.metrics import best_mask
from samrepro.patch import PatchUnavailable

SAF_PACKAGE = "segment_anything_fast"
SAF_DTYPE = torch.bfloat16  # build_sam_fast_*'s default
FLASH_4_CONFIGS = "flash_4_configs.p"  # SAF's flash_4 keeps its autotuned choice in this file of the cwd


def import_checkout(root: Path, package: str = SAF_PACKAGE) -> ModuleType:
    """`package` imported from the checkout at `root`, never from an installed copy; root leaves sys.path after."""
    root = root.resolve()
    if not (root / package / "__init__.py").is_file():
        raise FileNotFoundError(f"{root} has no {package}/__init__.py: pass a segment-anything-fast checkout")
    module = sys.modules.get(package)
    if module is None:
        sys.path.insert(0, str(root))
        try:
            module = importlib.import_module(package)
        finally:
            sys.path.remove(str(root))
    origin = Path(module.__file__).resolve()
    if not origin.is_relative_to(root):
        raise ImportError(f"{package} was imported from {origin}, not from the checkout {root}")
    return module


def checkout_info(root: Path, package: str = SAF_PACKAGE) -> dict:
    """The checkout's commit (+ "-dirty"; None without its own .git) and a SHA-256 of its package's .py files."""
    commit, digest = None, hashlib.sha256()
    if (root / ".git").exists():  # not the commit of a repository that merely contains the folder
        git = ["git", "-c", "safe.directory=*", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"]
        with contextlib.suppress(OSError):
            out = subprocess.run(git, capture_output=True, text=True)
            commit = out.stdout.strip() if out.returncode == 0 else None
    for path in sorted((root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return {"dir": str(root), "commit": commit, "package_sha256": digest.hexdigest()}


def flash_4_choices() -> dict[str, list[int]]:
    """flash_4's launch per query shape, "B x heads x tokens x d": [BLOCK_M, BLOCK_N, warps, stages], from its
    pickle in the cwd ({} without one). Its keys are tuples of input shapes and strides, the query's shape first."""
    path = Path(FLASH_4_CONFIGS)
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        table = pickle.load(f)  # written by SAF's flash_4 in this run's cwd, or carried from an earlier run
    return {" x ".join(map(str, key[0])): list(launch) for key, launch in table.items()}


def saf_model(args, device: torch.device, info: dict) -> tuple[ModuleType, torch.nn.Module]:
    """SAF's package and its fast model (its modules, bf16, compiled encoder) on the same weights, built as its
    build_sam_fast_* builds it."""
    if device.type != "cuda" and int(os.environ.get("SEGMENT_ANYTHING_FAST_USE_FLASH_4", "1")):
        raise PatchUnavailable(
            "SAF's bf16 attention calls flash_4, a Triton kernel registered for CUDA only "
            "(SEGMENT_ANYTHING_FAST_USE_FLASH_4=0 runs its SDPA fallback, which is then not its fast model)"
        )
    saf = import_checkout(args.saf_dir)
    present = Path(FLASH_4_CONFIGS).is_file()  # in the cwd, where flash_4 reads and writes it
    # a file made for another model lacks this model's shapes: flash_4 then autotunes those (its log says so)
    info["flash_4_configs"] = f"file present in {Path.cwd()}" if present else "autotuned in the warm-up"
    sam = saf.sam_model_registry[args.model]()  # fp32, uncompiled, SAF's modules
    sam.load_state_dict(load_model(args.model, "cpu", "random", args.seed).state_dict())  # strict: same names
    builders = importlib.import_module(f"{saf.__name__}.build_sam")  # `saf.build_sam` is a function
    sam = builders._apply_eval_dtype_sam(sam.to(device), SAF_DTYPE)  # what build_sam_fast_* does, then compile
    if args.compile_mode != "none":
        sam.image_encoder = torch.compile(sam.image_encoder, mode=args.compile_mode)
    info.update(dtype=str(SAF_DTYPE).removeprefix("torch."), compile_mode=args.compile_mode)
    return saf, sam


def saf_contender(args, device: torch.device, info: dict):
    """SAF's fast model driven as eval_combo drives it."""
    saf, sam = saf_model(args, device, info)
    info["decoder"] = args.saf_decoder
    predictor, official = saf.SamPredictor(sam), SamPredictor(sam)  # the official one only for the input transform

    def make_batch(chunk):  # SAF's collate: image and coordinates in bf16, jagged prompts, all before the clock
        batch = prepare(sam, official, chunk, args.batch_size, device)
        batch.x = batch.x.to(SAF_DTYPE)
        coords = [p["point_coords"].to(SAF_DTYPE) for p in batch.prompts]  # N, 1, 2 each
        if args.saf_decoder == "loop" or args.latency:
            return batch, coords, [p["point_labels"].int() for p in batch.prompts]  # N, 1 each
        nested = torch.nested.nested_tensor([c[:, 0] for c in coords], layout=torch.jagged)  # n, j, 2
        ones = torch.ones_like(nested, dtype=torch.int).prod(dim=-1, keepdim=True)  # n, j, 1: SAF's, same raggedness
        return batch, nested.unsqueeze(2), ones  # n, j, 1, 2

    def run_batch(inputs):
        batch, coords, labels = inputs
        features = sam.image_encoder(batch.x)[: batch.real]  # n, C, h, w
        predictor.reset_image()
        if args.saf_decoder == "nested":
            predictor.input_sizes, predictor.original_sizes = batch.input_sizes, batch.original_sizes
            predictor.features, predictor.is_image_set = features, True
            masks, iou, _ = predictor.predict_torch(point_coords=coords, point_labels=labels, multimask_output=True)
            return [best_mask(m[:, 1:], s[:, 1:]) for m, s in zip(masks.unbind(), iou.unbind())]  # 0: single mask
        out = []
        for i in range(batch.real):
            predictor.input_size, predictor.original_size = batch.input_sizes[i], batch.original_sizes[i]
            predictor.features, predictor.is_image_set = features[i : i + 1], True
            masks, iou, _ = predictor.predict_torch(coords[i], labels[i], multimask_output=True)  # N, 3, H, W
            out.append(best_mask(masks, iou))
        return out

    def encode(inputs):
        return sam.image_encoder(inputs[0].x)  # 1, C, h, w

    def click(inputs, features, k):  # SAF's predictor on one prompt: (1, 1, 2) bf16 coords
        batch, coords, labels = inputs
        predictor.input_size, predictor.original_size = batch.input_sizes[0], batch.original_sizes[0]
        predictor.features, predictor.is_image_set = features, True
        masks, iou, _ = predictor.predict_torch(coords[0][k : k + 1], labels[0][k : k + 1], multimask_output=True)
        return best_mask(masks, iou)  # 1, H, W

    return (make_batch, encode, click) if args.latency else (make_batch, run_batch)
