"""COCO-format instance sets through pycocotools, with SAF's prompts: one center point per annotation."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from samrepro.workload import Sample


def center_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a (H, W) bool mask: its center of mass if inside, else the pixel farthest from the boundary."""
    if not mask.any():
        raise ValueError("center_point: empty mask")
    cy, cx = ndimage.center_of_mass(mask)
    y, x = int(round(cy)), int(round(cx))  # Python's round, as SAF does
    if mask[y, x]:
        return x, y
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # H, W; the image edge counts as boundary
    y, x = np.unravel_index(np.argmax(dist), dist.shape)  # first maximum in row-major order
    return int(x), int(y)


def _open(images_dir: Path, annotations: Path) -> tuple[COCO, list[int]]:
    """The COCO index and the sorted ids of images with at least one annotation; one-line errors naming the path."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO images folder not found: {images_dir}")
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotations file not found: {annotations}")
    try:
        dataset = json.loads(annotations.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed COCO annotations JSON {annotations}: {e}") from e
    if not isinstance(dataset, dict) or not {"images", "annotations"} <= dataset.keys():
        raise ValueError(f"malformed COCO annotations JSON {annotations}: needs 'images' and 'annotations' lists")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=i, iscrowd=None))
    if not ids:
        raise ValueError(f"no images with annotations in {annotations}")
    return coco, ids


def _sample(coco: COCO, images_dir: Path, image_id: int) -> Sample:
    """One image (RGB) with a center-point prompt and the ground-truth mask of each annotation, crowd included."""
    info = coco.imgs[image_id]
    path = images_dir / info["file_name"]
    image = np.asarray(Image.open(path).convert("RGB"))  # H, W, 3 uint8; grayscale replicated to RGB
    if image.shape[:2] != (info["height"], info["width"]):
        raise ValueError(
            f"{path} is {image.shape[1]}x{image.shape[0]}, annotations say {info['width']}x{info['height']}"
        )
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])  # N, H, W
    masks = masks[masks.any(axis=(1, 2))]  # an empty mask has no point to prompt with
    points = np.array([[center_point(m)] for m in masks], dtype=np.float32).reshape(-1, 1, 2)  # N, 1, 2 (x, y)
    labels = np.ones((len(masks), 1), dtype=np.int64)  # N, 1 foreground
    return Sample(image=image, points=points, labels=labels, gt_masks=masks, image_id=image_id)


def iter_coco(images_dir: Path, annotations: Path, limit: int | None = None) -> Iterator[Sample]:
    """Samples one at a time, by image id; the folder and JSON are checked before the first one."""
    coco, ids = _open(Path(images_dir), Path(annotations))
    return (_sample(coco, Path(images_dir), i) for i in ids[:limit])


def load_coco(images_dir: Path, annotations: Path, limit: int | None = None) -> list[Sample]:
    """The first `limit` (default all) images with at least one annotation, by image id, as Samples."""
    return list(iter_coco(images_dir, annotations, limit))
