"""The synthetic generator, its COCO files, and the pycocotools loader (SAF's center-point prompts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from samrepro.data import center_point, load_coco, load_dataset, noise_samples, write_coco
from samrepro.data.synthetic import SIDE, SPLITS, image_rng, make_image


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digest(split: str, seed: int, index: int) -> str:
    image, masks = make_image(image_rng(split, seed, index))
    return hashlib.sha256(image.tobytes() + np.stack(masks).tobytes()).hexdigest()


def test_make_image_shapes_and_visible_masks():
    shapes = set()
    for i in range(12):
        image, masks = make_image(image_rng("train", 0, i))
        h, w = image.shape[:2]
        shapes.add((h, w))
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
        assert SIDE[0] <= min(h, w) and max(h, w) <= SIDE[1] and 0.5 <= w / h <= 2
        assert masks and all(m.dtype == bool and m.shape == (h, w) and m.sum() >= 30 for m in masks)
        assert np.stack(masks).sum(0).max() == 1  # visible parts never overlap
    assert any(h != w for h, w in shapes)


def test_write_coco_is_deterministic_and_reused(tmp_path):
    a = write_coco(tmp_path / "a", 4, seed=3)
    b = write_coco(tmp_path / "b", 4, seed=3)
    c = write_coco(tmp_path / "c", 4, seed=4)
    assert _files(a.parent) == _files(b.parent)
    assert a.read_bytes() != c.read_bytes()
    assert json.loads(a.read_text())["info"].items() >= {"seed": 3, "num_images": 4, "split": "val"}.items()
    mtime = a.stat().st_mtime_ns
    assert write_coco(tmp_path / "a", 4, seed=3) == a and a.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left behind


def test_write_coco_replaces_other_parameters_and_refuses_foreign_folders(tmp_path):
    write_coco(tmp_path / "s", 2, seed=0)
    json_path = write_coco(tmp_path / "s", 3, seed=0)
    assert json.loads(json_path.read_text())["info"]["num_images"] == 3
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="mine"):
        write_coco(tmp_path / "mine", 2, seed=0)


def test_splits_share_no_image():
    train = {_digest("train", 0, i) for i in range(25)}
    val = {_digest("val", 0, i) for i in range(25)}
    assert len(train) == len(val) == 25 and not train & val
    assert set(SPLITS) == {"train", "val"}
    with pytest.raises(ValueError, match="train, val"):
        image_rng("test", 0, 0)


def test_coco_json_round_trips_through_pycocotools(tmp_path):
    json_path = write_coco(tmp_path / "set", 3, seed=7)
    coco = COCO(str(json_path))
    samples = load_coco(json_path.parent / "images", json_path)
    assert [s.image_id for s in samples] == [1, 2, 3]
    for i, s in enumerate(samples):
        image, masks = make_image(image_rng("val", 7, i))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=i + 1))
        decoded = np.stack([coco.annToMask(a).astype(bool) for a in anns])
        assert np.array_equal(decoded, np.stack(masks)) and np.array_equal(s.gt_masks, decoded)
        assert np.array_equal(s.image, image)
        assert [a["area"] for a in anns] == [float(m.sum()) for m in masks]
        assert all(a["iscrowd"] == 0 and 1 <= a["category_id"] <= len(coco.cats) for a in anns)


def _ring(h: int, w: int, cut: bool) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    mask = (r > 10) & (r < 20)
    return mask & ~((xx > w / 2) & (np.abs(yy - h / 2) < 5)) if cut else mask  # C-shape: a gap on the right


def test_center_point_is_center_of_mass_when_inside():
    mask = np.zeros((50, 80), bool)
    mask[10:31, 20:61] = True  # convex: its center of mass (20, 40) is inside
    assert center_point(mask) == (40, 20)


@pytest.mark.parametrize("cut", [False, True], ids=["ring", "c-shape"])
def test_center_point_falls_back_to_farthest_from_boundary(cut):
    mask = _ring(60, 70, cut)
    cy, cx = ndimage.center_of_mass(mask)
    assert not mask[round(cy), round(cx)]
    x, y = center_point(mask)
    dist = ndimage.distance_transform_edt(mask)
    assert mask[y, x] and dist[y, x] == dist.max()


def test_center_point_counts_the_image_edge_as_boundary():
    mask = np.zeros((40, 40), bool)
    mask[:, :6] = True
    mask[:, 34:] = True  # two bars touching the image edges; the center of mass falls between them
    x, y = center_point(mask)
    assert mask[y, x] and x in (2, 3, 36, 37)


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed RLE (counts as a list of ints), the form COCO uses for crowd annotations."""
    flat = mask.T.ravel()  # column-major
    edges = np.flatnonzero(np.diff(np.r_[0, flat.astype(int), 0])) if flat.any() else np.array([], int)
    runs = np.diff(np.r_[0, edges, flat.size])
    return {"counts": runs.tolist(), "size": list(mask.shape)}


@pytest.fixture
def tiny_coco(tmp_path) -> Path:
    """A hand-made COCO dir: a colour image, a grayscale image with a crowd RLE, and an image without annotations."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(root / "val2017" / "a.png")
    Image.fromarray(np.full((24, 16), 50, np.uint8)).save(root / "val2017" / "gray.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "val2017" / "empty.png")
    crowd = np.zeros((24, 16), bool)
    crowd[4:12, 2:14] = True
    images = [
        {"id": 9, "file_name": "gray.png", "height": 24, "width": 16},
        {"id": 5, "file_name": "empty.png", "height": 10, "width": 10},
        {"id": 2, "file_name": "a.png", "height": 20, "width": 30},
    ]
    annotations = [
        {"id": 1, "image_id": 9, "category_id": 3, "iscrowd": 1, "segmentation": _rle(crowd), "area": 96.0},
        {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 50.0, "segmentation": [[5, 5, 15, 5, 15, 10]]},
        {"id": 3, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 4.0, "segmentation": [[1, 18, 5, 18, 5, 22]]},
    ]
    categories = [{"id": i, "name": f"c{i}"} for i in (1, 3)]
    doc = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(_rle(crowd), 24, 16)).astype(bool), crowd)
    return root


def test_load_coco_skips_unannotated_images_and_keeps_crowds(tiny_coco):
    samples = load_coco(tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json")
    assert [s.image_id for s in samples] == [2, 9]  # sorted by id; image 5 has no annotation
    gray = samples[1]
    assert gray.image.shape == (24, 16, 3) and gray.image.dtype == np.uint8 and (gray.image == 50).all()
    assert gray.gt_masks.shape == (2, 24, 16) and gray.gt_masks.dtype == bool
    assert gray.gt_masks[0].sum() == 96  # the crowd annotation, decoded from its RLE
    assert gray.points.shape == (2, 1, 2) and gray.points.dtype == np.float32
    assert gray.points[0, 0].tolist() == [8.0, 8.0]  # (x, y) = its center of mass
    assert gray.labels.shape == (2, 1) and (gray.labels == 1).all() and gray.boxes is None
    for s in samples:
        for (x, y), m in zip(s.points[:, 0].astype(int), s.gt_masks):
            assert m[y, x]
    assert len(load_coco(tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json", limit=1)) == 1


def test_load_coco_errors_name_the_path(tiny_coco, tmp_path):
    json_path = tiny_coco / "annotations" / "instances_val2017.json"
    bad, not_coco, empty = tmp_path / "bad.json", tmp_path / "list.json", tmp_path / "empty.json"
    bad.write_text("{not json")
    not_coco.write_text("[1, 2]")
    empty.write_text(json.dumps({"images": [{"id": 1, "file_name": "x", "height": 1, "width": 1}], "annotations": []}))
    cases = [
        (tmp_path / "nowhere", json_path, FileNotFoundError, "images folder not found"),
        (tiny_coco / "val2017", tmp_path / "missing.json", FileNotFoundError, "annotations file not found"),
        (tiny_coco / "val2017", bad, ValueError, "malformed COCO annotations JSON"),
        (tiny_coco / "val2017", not_coco, ValueError, "malformed COCO annotations JSON"),
        (tiny_coco / "val2017", empty, ValueError, "no images with annotations"),
    ]
    for folder, ann_file, error, words in cases:
        with pytest.raises(error) as info:
            load_coco(folder, ann_file)
        message = str(info.value)
        assert words in message and "\n" not in message
        assert str(folder if "folder" in words else ann_file) in message


def test_load_dataset(tiny_coco, tmp_path):
    samples, label = load_dataset("synthetic", 2, tmp_path / "cache")
    assert label == "synthetic-val(seed=0, n=2)" and len(samples) == 2
    assert (tmp_path / "cache" / "synthetic-val-0-2" / "annotations.json").is_file()
    samples, label = load_dataset(f"coco:{tiny_coco}", 1, tmp_path / "cache")
    assert label == "coco:val2017(n=1)" and [s.image_id for s in samples] == [2]
    for spec in ("imagenet", "coco:"):
        with pytest.raises(ValueError, match="synthetic, coco:DIR"):
            load_dataset(spec, 1, tmp_path)


def test_noise_samples_are_seeded():
    a, b = noise_samples(2, 8, seed=3, side=64), noise_samples(2, 8, seed=3, side=64)
    assert a[0].image.shape == (64, 64, 3) and a[0].image.dtype == np.uint8 and a[0].gt_masks is None
    assert a[1].points.shape == (8, 1, 2) and a[1].labels.shape == (8, 1) and (a[1].points < 64).all()
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.points, y.points) for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, noise_samples(1, 8, seed=4, side=64)[0].image)


def test_load_dataset_noise(tmp_path):
    samples, label = load_dataset("noise", 2, tmp_path)
    assert len(samples) == 2 and samples[0].image.shape == (1024, 1024, 3) and samples[0].num_prompts == 8
    assert "8 points/image" in label
    samples, label = load_dataset("noise:64", 1, tmp_path)
    assert samples[0].num_prompts == 64 and "64 points/image" in label
    for spec in ("noise:0", "noise:x", "noise:"):
        with pytest.raises(ValueError, match="noise:P"):
            load_dataset(spec, 1, tmp_path)
