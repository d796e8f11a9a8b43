"""Datasets as Samples: the seeded synthetic set and COCO val2017, both read through one pycocotools loader."""

from __future__ import annotations

from pathlib import Path

from samrepro.data.coco import center_point, iter_coco, load_coco
from samrepro.data.synthetic import DEFAULT_SEED, write_coco
from samrepro.workload import Sample

SPECS = ("synthetic", "coco:DIR")  # DIR holds val2017/ and annotations/instances_val2017.json

__all__ = ["SPECS", "center_point", "iter_coco", "load_coco", "load_dataset", "write_coco"]


def load_dataset(spec: str, num_images: int, cache_dir: Path) -> tuple[list[Sample], str]:
    """Samples and a results label for `spec`: the synthetic validation split (cached) or COCO val2017 (first n)."""
    if spec == "synthetic":
        root = Path(cache_dir) / f"synthetic-val-{DEFAULT_SEED}-{num_images}"
        samples = load_coco(root / "images", write_coco(root, num_images, DEFAULT_SEED, split="val"))
        return samples, f"synthetic-val(seed={DEFAULT_SEED}, n={num_images})"
    if spec.startswith("coco:") and spec[5:]:
        root = Path(spec[5:]).expanduser()
        samples = load_coco(root / "val2017", root / "annotations" / "instances_val2017.json", limit=num_images)
        return samples, f"coco:val2017(n={len(samples)})"
    raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(SPECS)}")
