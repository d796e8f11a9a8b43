"""CPU smoke tests of the tiny SAM training tool: outputs, learning, determinism, data order, preprocessing."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from samrepro.data.synthetic import image_rng, make_image
from samrepro.models import build_tiny, load_model, sha256
from tools.train_tiny import cli, data, loop, loss


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin against each other (25x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_RUN = ["--device", "cpu", "--batch-size", "1", "--prompts-per-image", "2", "--val-images", "2"]


def run(tmp_path, name: str, *extra: str):
    """One training run into tmp_path/name: (weights path, report dir)."""
    out = tmp_path / name
    argv = [*TINY_RUN, "--out", str(out / "w"), "--report-dir", str(out / "r"), "--data-dir", str(tmp_path / "data")]
    assert cli.main([*argv, *extra]) == 0
    return out / "w" / "sam_tiny.safetensors", out / "r"


def test_run_writes_loadable_weights_json_and_report(tmp_path):
    weights, report = run(tmp_path, "a", "--steps", "4", "--val-every", "2", "--log-every", "2", "--num-workers", "2")
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256(weights)
    assert (meta["steps"], meta["stopped_by"], meta["val_images"]) == (4, "steps", 2)
    assert 0.0 <= meta["val_miou"] <= 1.0
    label = load_model("tiny", weights=weights).weights_label
    assert meta["sha256"][:12] in label
    history = json.loads((report / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [2, 4]
    assert [r["step"] for r in history["val"]] == [2, 4]
    assert (report / "training.png").stat().st_size > 0


def test_same_seed_same_weights(tmp_path):
    steps = ("--steps", "3", "--num-workers", "0", "--val-every", "100")
    a, b, other = (
        run(tmp_path, name, *steps, "--seed", seed)[0] for name, seed in (("a", "0"), ("b", "0"), ("c", "1"))
    )
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != other.read_bytes()


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    sam = build_tiny().train()
    batch = data.make_batch(seed=0, batch=0, batch_size=1, slots=3)
    opt = torch.optim.AdamW(sam.parameters())
    losses = [loop.train_step(sam, opt, batch, lr=1e-3, clip=1.0)[0].item() for _ in range(30)]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_batches_are_train_images_in_order_for_any_worker_count():
    loader = DataLoader(data.TrainBatches(seed=0, batch_size=1, slots=2), batch_size=None, num_workers=2)
    got = list(itertools.islice(loader, 3))
    for i, batch in enumerate(got):
        ref = data.make_batch(0, i, 1, 2)
        assert all(torch.equal(batch[k], ref[k]) for k in ref)
    image, _ = make_image(image_rng("train", 0, 1))
    h, w = got[1]["size"][0].tolist()
    assert np.array_equal(got[1]["image"][0, :, :h, :w].permute(1, 2, 0).numpy(), data.RESIZE.apply_image(image))


def test_prompts_hit_their_mask():
    rng = np.random.default_rng(0)
    _, masks = make_image(image_rng("train", 0, 0))
    for mask in masks:
        for kind in (data.POINT, data.MULTI):
            points, labels, _ = data.sample_prompts(rng, mask, *data.pixels(mask), kind)
            used = labels >= 0
            x, y = points[used].astype(int).T
            assert np.array_equal(mask[y, x], labels[used] == 1)


def test_normalize_is_sam_preprocess():
    sam = build_tiny()
    batch = data.make_batch(seed=0, batch=0, batch_size=2, slots=1)
    x, valid = loss.normalize(sam, batch["image"], batch["size"])  # B, 3, S, S; B, S, S
    for i, (h, w) in enumerate(batch["size"].tolist()):
        assert torch.equal(x[i : i + 1], sam.preprocess(batch["image"][i : i + 1, :, :h, :w].float()))
        assert valid[i].sum() == h * w


@torch.no_grad()
def test_decode_matches_predict_masks():
    sam = load_model("tiny", weights="random")
    torch.manual_seed(0)
    emb = torch.randn(1, 128, 16, 16)  # one image's embedding
    points, labels = torch.rand(5, 2, 2) * 256, torch.tensor([[1, 0]] * 5)
    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    ref = sam.mask_decoder.predict_masks(emb, pe, sparse, dense)  # repeats the embedding per prompt itself
    out = loss.decode(sam.mask_decoder, emb.expand(5, -1, -1, -1), pe, sparse, dense)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
