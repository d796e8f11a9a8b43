"""The speed workload: seeded noise square images, each with P single foreground points, no ground truth."""

from __future__ import annotations

import numpy as np

from samrepro.workload import Sample

SIDE = 1024
PROMPTS = 8


def noise_samples(images: int, prompts: int = PROMPTS, seed: int = 0, side: int = SIDE) -> list[Sample]:
    """`images` (side, side, 3) uint8 noise images with `prompts` points each, uniform over the image."""
    rng, samples = np.random.default_rng(seed), []
    for i in range(images):
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        points = rng.uniform(0, side, (prompts, 1, 2)).astype(np.float32)  # N, 1, 2: x, y
        samples.append(Sample(image, points, labels=np.ones((prompts, 1), dtype=np.int64), image_id=i))  # N, 1
    return samples
