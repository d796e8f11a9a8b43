"""Training batches: train-split synthetic images in tiny's input frame, each with prompts of three kinds.

Step b trains on train-split images b*B .. b*B+B-1 of `samrepro.data.synthetic`, each drawn from its own generator
`image_rng("train", seed, index)`, which then also draws that image's prompts. DataLoader worker w makes batches
w, w+W, w+2W, ... and the loader hands them out in order, so the data is the same for any worker count.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import IterableDataset, get_worker_info

from samrepro.data import center_point
from samrepro.data.synthetic import image_rng, make_image

SIZE = 256  # tiny's input side
RESIZE = ResizeLongestSide(SIZE)
P_MAX = 4  # points of a multi-point prompt, padded with label -1
POINT, BOX, MULTI = 0, 1, 2  # prompt kinds
KIND_P = (0.6, 0.2, 0.2)  # the evaluation uses single points only, so they dominate
CENTER_P = 0.5  # share of single points at the evaluation's center point (the rest uniform inside the mask)


def pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ys, xs of a (H, W) bool mask's pixels, searched within its bounding box only."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    ys, xs = np.nonzero(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return ys + rows[0], xs + cols[0]


def sample_prompts(
    rng: np.random.Generator, mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, kind: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One prompt for `mask` (H, W) bool, whose pixels are ys, xs, in its pixel frame.

    Returns points (P_MAX, 2) x, y, labels (P_MAX,) (-1 unused) and box (4,) x0, y0, x1, y1.
    """
    points, labels, box = np.zeros((P_MAX, 2), np.float32), np.full(P_MAX, -1, np.int64), np.zeros(4, np.float32)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    h, w = mask.shape

    def inside() -> tuple[int, int]:
        i = rng.integers(len(xs))
        return xs[i], ys[i]

    if kind == BOX:  # SAM-style jitter: std 10% of the side, at most 20 px
        noise = np.clip(rng.normal(0, 0.1, 4) * [x1 - x0, y1 - y0, x1 - x0, y1 - y0], -20, 20)
        box[:] = np.clip([x0, y0, x1, y1] + noise, 0, [w - 1, h - 1, w - 1, h - 1])
    elif kind == POINT:
        if rng.random() < CENTER_P:  # the evaluation's point, searched in the bounding box only (faster)
            cx, cy = center_point(mask[y0 : y1 + 1, x0 : x1 + 1])
            points[0] = x0 + cx, y0 + cy
        else:
            points[0] = inside()
        labels[0] = 1
    else:  # MULTI: a positive point, then 1..P_MAX-1 more, each positive or a negative near the object
        points[0], labels[0] = inside(), 1
        mx, my = (x1 - x0) // 2 + 1, (y1 - y0) // 2 + 1  # margin around the box for negatives
        bx0, by0 = max(x0 - mx, 0), max(y0 - my, 0)
        oy, ox = np.nonzero(~mask[by0 : y1 + my + 1, bx0 : x1 + mx + 1])
        for j in range(1, int(rng.integers(2, P_MAX + 1))):
            if rng.random() < 0.5 and len(ox):
                i = rng.integers(len(ox))
                points[j], labels[j] = (bx0 + ox[i], by0 + oy[i]), 0
            else:
                points[j], labels[j] = inside(), 1
    return points, labels, box


def make_example(seed: int, index: int, slots: int) -> dict[str, np.ndarray]:
    """Train image `index` in the model frame, with `slots` prompts cycling over its objects in random order."""
    rng = image_rng("train", seed, index)
    image, masks = make_image(rng)
    size = image.shape[:2]
    h, w = RESIZE.get_preprocess_shape(*size, SIZE)
    padded = np.zeros((SIZE, SIZE, 3), np.uint8)
    padded[:h, :w] = RESIZE.apply_image(image)
    objects = [masks[i] for i in rng.permutation(len(masks))[:slots]]
    resized = [RESIZE.apply_image(m.astype(np.uint8) * 255) >= 128 for m in objects]  # h, w each: like the image
    coords = [pixels(m) for m in objects]
    kinds = rng.choice(3, size=slots, p=KIND_P)
    gt = np.zeros((slots, SIZE, SIZE), bool)
    prompts = []
    for j, kind in enumerate(kinds):
        o = j % len(objects)
        gt[j, :h, :w] = resized[o]
        prompts.append(sample_prompts(rng, objects[o], *coords[o], kind))
    points, labels, boxes = (np.stack(p) for p in zip(*prompts))
    return {
        "image": padded.transpose(2, 0, 1),  # 3, S, S uint8, not yet normalised
        "size": np.array([h, w]),
        "masks": gt,  # slots, S, S
        "kinds": kinds,  # slots
        "points": RESIZE.apply_coords(points, size).astype(np.float32),  # slots, P_MAX, 2 in the model frame
        "labels": labels,  # slots, P_MAX
        "boxes": RESIZE.apply_boxes(boxes, size).astype(np.float32),  # slots, 4
    }


def make_batch(seed: int, batch: int, batch_size: int, slots: int) -> dict[str, torch.Tensor]:
    """Batch number `batch`: train images batch*batch_size onwards, stacked."""
    examples = [make_example(seed, batch * batch_size + i, slots) for i in range(batch_size)]
    return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


class TrainBatches(IterableDataset):
    """Endless batches; with W workers, worker w makes batches w, w+W, ... (the loader interleaves them in order)."""

    def __init__(self, seed: int, batch_size: int, slots: int) -> None:
        self.seed, self.batch_size, self.slots = seed, batch_size, slots

    def __iter__(self):
        info = get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for b in itertools.count(first, stride):
            yield make_batch(self.seed, b, self.batch_size, self.slots)
