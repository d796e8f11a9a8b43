"""Datasets as Samples: the synthetic set and COCO val2017 (one pycocotools loader), and the noise speed workload."""

from __future__ import annotations

from pathlib import Path

from samrepro.data.coco import center_point, iter_coco, load_coco
from samrepro.data.noise import PROMPTS, SIDE, noise_samples
from samrepro.data.synthetic import DEFAULT_SEED, write_coco
from samrepro.workload import Sample

SPECS = ("synthetic", "coco:DIR", "noise[:P]")  # DIR holds val2017/ and annotations/instances_val2017.json

__all__ = ["SPECS", "center_point", "iter_coco", "load_coco", "load_dataset", "noise_samples", "write_coco"]


def load_dataset(spec: str, num_images: int, cache_dir: Path) -> tuple[list[Sample], str]:
    """Samples and a results label for `spec`: the synthetic validation split (cached), COCO val2017 (first n), or
    `noise[:P]`, the speed workload: 1024x1024 noise images with P (default 8) points each, no ground truth."""
    if spec == "synthetic":
        root = Path(cache_dir) / f"synthetic-val-{DEFAULT_SEED}-{num_images}"
        samples = load_coco(root / "images", write_coco(root, num_images, DEFAULT_SEED, split="val"))
        return samples, f"synthetic-val(seed={DEFAULT_SEED}, n={num_images})"
    if spec.startswith("coco:") and spec[5:]:
        root = Path(spec[5:]).expanduser()
        samples = load_coco(root / "val2017", root / "annotations" / "instances_val2017.json", limit=num_images)
        return samples, f"coco:val2017(n={len(samples)})"
    if spec == "noise" or spec.startswith("noise:"):
        text = spec[6:] if ":" in spec else str(PROMPTS)
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"noise:P needs a positive number of prompts per image, got {spec!r}")
        prompts = int(text)
        return noise_samples(num_images, prompts), f"noise(seed=0, n={num_images}, {SIDE}px, {prompts} points/image)"
    raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(SPECS)}")
