"""The trained weights and the provenance JSON shipped beside them."""

from __future__ import annotations

import argparse
import os
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam

from samrepro import models
from samrepro.data.synthetic import SPLITS, VERSION
from tools.train_tiny.data import CENTER_P, KIND_P, P_MAX, SIZE
from tools.train_tiny.loss import DICE_W, FOCAL_W, IOU_W


def save_weights(sam: Sam, path: Path) -> str:
    """The whole state_dict as fp32 contiguous safetensors, written atomically; returns its SHA-256."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in sam.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; the package ships it
    os.replace(tmp, path)
    return models.sha256(path)


def architecture(sam: Sam) -> dict:
    """build_tiny's configuration, read back from the model."""
    enc, dec = sam.image_encoder, sam.mask_decoder
    return {
        "builder": "samrepro.models.build_tiny",
        "img_size": enc.img_size,
        "patch_size": enc.patch_embed.proj.kernel_size[0],
        "embed_dim": enc.patch_embed.proj.out_channels,
        "depth": len(enc.blocks),
        "num_heads": enc.blocks[0].attn.num_heads,
        "window_size": max(blk.window_size for blk in enc.blocks),
        "global_attn_indexes": [i for i, blk in enumerate(enc.blocks) if blk.window_size == 0],
        "decoder_depth": len(dec.transformer.layers),
        "num_multimask_outputs": dec.num_multimask_outputs,
        "parameters": sum(p.numel() for p in sam.parameters()),
    }


def provenance(sam: Sam, args: argparse.Namespace, **run) -> dict:
    """The JSON shipped next to the weights: architecture, recipe, data, environment, and the `run` results."""
    device = sam.pixel_mean.device
    return {
        "model": "tiny",
        "config": architecture(sam),
        "seed": args.seed,
        "init": None if args.init is None else {"file": args.init.name, "sha256": models.sha256(args.init)},
        "batch_size": args.batch_size,
        "prompts_per_image": args.prompts_per_image,
        "lr": args.lr,
        "optimizer": f"AdamW, weight decay {args.weight_decay} (matrices only), grad norm clip {args.clip}",
        "schedule": f"warm-up {args.warmup} steps, then cosine to 1% by max(step/steps, time/budget)",
        "loss": f"{FOCAL_W} focal + {DICE_W} dice (best of 3 for single points) + {IOU_W} IoU MSE, at {SIZE} px",
        "prompts": {"kind_p(point, box, multi)": KIND_P, "center_point_p": CENTER_P, "max_points": P_MAX},
        "data": {
            "generator": "samrepro.data.synthetic.make_image",
            "generator_version": VERSION,
            "train": f"image_rng('train', {args.seed}, index), split key {SPLITS['train']}, index = step*B + i",
        },
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "segment_anything": version("segment-anything"),
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "num_workers": args.num_workers,
        "time_budget_s": args.time_budget_s,
        **run,
    }
