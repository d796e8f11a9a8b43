"""Seeded synthetic segmentation set: textured, overlapping shapes with known visible masks, written in COCO format."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ("ellipse", "rectangle", "polygon", "star", "ring", "blob")  # category ids 1..6, in this order
TEXTURES = ("solid", "gradient", "stripes", "checker", "smooth")
SPLITS = {"train": 0, "val": 1}  # first spawn key of each image's seed: streams of different splits never coincide
DEFAULT_SEED = 0
VERSION = 1  # bump whenever the generator's output changes; recorded in the JSON's info
MIN_VISIBLE_PX = 30
MIN_VISIBLE_FRAC = 0.005  # of the image area: smaller visible remnants stay painted but unannotated
SIDE = (160, 640)  # image side range in pixels; aspect ratio within [1/2, 2]
OBJECTS = (2, 8)  # objects placed per image, before dropping hidden ones


def image_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: SeedSequence(seed).spawn tree keyed (split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index)))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours (3, 1, 1) float32: a base and a second one, near or far from it."""
    c0 = rng.uniform(0, 255, (3, 1, 1)).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, rng.choice([30.0, 90.0]), (3, 1, 1)), 0, 255).astype(np.float32)
    return c0, c1


def _hat(n: int, g: int) -> np.ndarray:
    """Linear-interpolation weights (n, g + 1) from g + 1 evenly spaced knots onto n samples."""
    return np.maximum(0, 1 - np.abs(np.linspace(0, g, n, dtype=np.float32)[:, None] - np.arange(g + 1)))


def _smooth_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency noise (h, w) in [0, 1]: a coarse random grid, bilinearly upsampled."""
    gh, gw = (int(g) for g in rng.integers(2, 7, 2))
    grid = rng.random((gh + 1, gw + 1), dtype=np.float32)
    return _hat(h, gh) @ grid @ _hat(w, gw).T  # h, w


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random fill (3, h, w) float32 of two colours: solid, gradient, stripes, checker or smooth blotches."""
    c0, c1 = _colours(rng)
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    if kind == "solid":
        return np.broadcast_to(c0, (3, h, w))
    if kind == "smooth":
        t = _smooth_field(rng, h, w)
    else:
        a = rng.uniform(0, np.pi)
        yy = np.arange(h, dtype=np.float32)[:, None]  # h, 1
        xx = np.arange(w, dtype=np.float32)[None, :]  # 1, w
        u, v = xx * math.cos(a) + yy * math.sin(a), yy * math.cos(a) - xx * math.sin(a)  # h, w rotated
        if kind == "gradient":
            t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        elif kind == "stripes":
            phase = u / rng.uniform(4, 40)
            t = (phase - np.floor(phase) < rng.uniform(0.3, 0.7)).astype(np.float32)
        else:
            cell = rng.uniform(4, 40)
            t = ((np.floor(u / cell) + np.floor(v / cell)).astype(np.int32) & 1).astype(np.float32)
    return c0 + t * (c1 - c0)


def _star_polygon(u: np.ndarray, v: np.ndarray, theta: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Inside test for the polygon with vertex k at radius radii[k], angle 2pi k / n: one half-plane per sector."""
    n = len(radii)
    angles = np.arange(n) * (2 * np.pi / n)
    vx, vy = radii * np.cos(angles), radii * np.sin(angles)  # n vertices, counter-clockwise
    ex, ey = np.roll(vx, -1) - vx, np.roll(vy, -1) - vy  # edge k runs from vertex k to k + 1
    edges = np.stack([ey, ex, vx * ey - vy * ex]).astype(np.float32)  # 3, n: inside iff u ey - v ex <= v_k x e_k
    k = ((theta + 2 * np.pi) * (n / (2 * np.pi))).astype(np.int32) % n  # h, w sector index
    return u * np.take(edges[0], k) - v * np.take(edges[1], k) <= np.take(edges[2], k)


def _shape(rng: np.random.Generator, kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in normalised, rotated coordinates u, v (h, w)."""
    q = u * u + v * v
    if kind == "ellipse":
        return q <= 1
    if kind == "rectangle":
        return np.maximum(np.abs(u), np.abs(v)) <= 1
    if kind == "ring":
        inside = (q <= 1) & (q >= rng.uniform(0.2, 0.6) ** 2)
        if rng.random() < 0.5:  # a C-shape: drop the wedge within `gap` radians of direction `phi`
            phi, gap = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 1.2)
            inside &= u * math.cos(phi) + v * math.sin(phi) < np.sqrt(q) * math.cos(gap)
        return inside
    theta = np.arctan2(v, u)  # h, w
    if kind == "blob":
        k = np.arange(2, 5, dtype=np.float32)[:, None, None]  # 3, 1, 1 harmonics
        amp = rng.uniform(0, 0.25, (3, 1, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (3, 1, 1)).astype(np.float32)
        radius = (1 + (amp * np.cos(k * theta + phase)).sum(0)) / (1 + amp.sum())
        return np.sqrt(q) <= radius
    if kind == "polygon":
        radii = rng.uniform(0.6, 1.0, rng.integers(3, 9))
    else:  # star
        radii = np.where(np.arange(2 * rng.integers(4, 9)) % 2 == 0, 1.0, rng.uniform(0.35, 0.7))
    return _star_polygon(u, v, theta, radii)


def _place(rng: np.random.Generator, h: int, w: int) -> tuple[str, tuple[slice, slice], np.ndarray] | None:
    """One random object: its kind, crop box in the image, and mask over that crop (None if off-image)."""
    kind = SHAPES[rng.integers(len(SHAPES))]
    r = min(h, w) * rng.uniform(0.08, 0.4)
    aspect = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
    rx, ry = r * math.sqrt(aspect), r / math.sqrt(aspect)
    cy, cx, a = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi)
    extent = math.hypot(rx, ry)
    y0, y1 = max(int(cy - extent), 0), min(int(cy + extent) + 1, h)
    x0, x1 = max(int(cx - extent), 0), min(int(cx + extent) + 1, w)
    if y1 <= y0 or x1 <= x0:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # h', 1 pixel centres
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx  # 1, w'
    u = (dx * math.cos(a) + dy * math.sin(a)) / rx  # h', w'
    v = (dy * math.cos(a) - dx * math.sin(a)) / ry
    return kind, (slice(y0, y1), slice(x0, x1)), _shape(rng, kind, u, v)


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A random image (H, W, 3) uint8 and the visible masks (H, W) bool of its annotated objects, back to front."""
    return _make(rng)[:2]


def _make(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """make_image plus each mask's shape kind."""
    while True:  # rarely, every object ends up hidden: draw again
        h = int(rng.integers(SIDE[0], SIDE[1] + 1))
        w = int(np.clip(round(h * math.exp(rng.uniform(-math.log(2), math.log(2)))), *SIDE))
        image = np.array(_texture(rng, h, w))  # 3, h, w float32 background (channels first: fast inner loops)
        owner = np.zeros((h, w), np.int16)  # 0 background, i + 1 object i (later objects overwrite)
        sigma = [rng.uniform(0, 20)]  # Gaussian noise level per owner
        kinds = []
        for _ in range(rng.integers(OBJECTS[0], OBJECTS[1] + 1)):
            placed = _place(rng, h, w)
            if placed is None:
                continue
            kind, box, m = placed
            region = image[(slice(None), *box)]  # 3, h', w' view
            paint = _texture(rng, *m.shape) - region  # 3, h', w'
            paint *= m
            region += paint  # the texture where the mask is set
            kinds.append(kind)
            owner[box][m] = len(kinds)
            sigma.append(rng.uniform(0, 25))
        a, gain = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4)  # illumination ramp across the image
        light = 1 + gain * math.cos(a) * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]  # 1, w
        light = light + gain * math.sin(a) * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]  # h, w
        noise = rng.standard_normal((h, w), dtype=np.float32)  # h, w luminance noise
        noise *= np.take(np.float32(sigma), owner)
        image *= light
        image += noise
        image = np.dstack(np.clip(image, 0, 255, out=image).astype(np.uint8))  # h, w, 3
        min_area = max(MIN_VISIBLE_PX, MIN_VISIBLE_FRAC * h * w)
        visible = [(owner == i + 1, k) for i, k in enumerate(kinds)]
        kept = [(m, k) for m, k in visible if np.count_nonzero(m) >= min_area]
        if kept:
            return image, [m for m, _ in kept], [k for _, k in kept]


def _info(json_path: Path) -> dict | None:
    """The `info` of an annotations file, None when unreadable."""
    try:
        return json.loads(json_path.read_text()).get("info")
    except (OSError, ValueError, AttributeError):
        return None


def write_coco(out_dir: Path, num_images: int, seed: int, split: str = "val") -> Path:
    """Write `num_images` images of `split` as out_dir/images/*.png + out_dir/annotations.json; reuse a matching set."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out_dir = Path(out_dir)
    json_path = out_dir / "annotations.json"
    info = {"generator": "samrepro.data.synthetic", "version": VERSION, "split": split, "seed": seed}
    info["num_images"] = num_images
    existing = _info(json_path) if out_dir.exists() else None
    if existing == info:
        return json_path
    if out_dir.exists() and (existing or {}).get("generator") != info["generator"]:
        raise FileExistsError(f"{out_dir} exists and is not a samrepro synthetic set; remove it or pick another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the set is a shared cache
    try:
        _write(tmp, num_images, seed, split, info)
        if out_dir.exists():  # an older version of this set: swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.rename(out_dir, old / "set")
            shutil.rmtree(old)
        os.rename(tmp, out_dir)
    except OSError:
        if _info(json_path) != info:  # not a concurrent writer that finished the same set first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json_path


def _write(root: Path, num_images: int, seed: int, split: str, info: dict) -> None:
    """Generate the set into `root` (a fresh folder)."""
    (root / "images").mkdir()
    images, annotations = [], []
    for i in range(num_images):
        image, masks, kinds = _make(image_rng(split, seed, i))
        name = f"{i + 1:06d}.png"
        Image.fromarray(image).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for m, kind in zip(masks, kinds):
            rle = mask_utils.encode(np.asfortranarray(m, dtype=np.uint8))
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": SHAPES.index(kind) + 1}
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            ann.update(area=float(mask_utils.area(rle)), bbox=mask_utils.toBbox(rle).tolist(), iscrowd=0)
            annotations.append(ann)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(coco))
