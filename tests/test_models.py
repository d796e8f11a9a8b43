"""Model loading: the shipped tiny weights are hash-checked; choices are explicit and labelled."""

from __future__ import annotations

import shutil

import pytest
import torch

from samrepro import models


def test_tiny_loads_the_shipped_weights_by_default():
    sam = models.load_model("tiny")
    label = sam.weights_label
    assert label.startswith("sam_tiny.safetensors sha256:")
    assert sum(p.numel() for p in sam.parameters()) == sum(p.numel() for p in models.build_tiny().parameters())


def test_tampered_tiny_weights_are_refused(tmp_path, monkeypatch):
    copy = tmp_path / "sam_tiny.safetensors"
    shutil.copy(models.TINY_WEIGHTS, copy)
    shutil.copy(models.TINY_WEIGHTS.with_suffix(".json"), tmp_path / "sam_tiny.json")
    with open(copy, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(models, "TINY_WEIGHTS", copy)
    with pytest.raises(ValueError, match="does not match"):
        models.load_model("tiny")


def test_explicit_choices_and_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs weights"):
        models.load_model("vit_b")
    with pytest.raises(ValueError, match="valid: tiny, vit_b"):
        models.load_model("vit_x", weights="random")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        models.load_model("tiny", weights=tmp_path / "missing.pth")
    label = models.load_model("tiny", weights="random", seed=3).weights_label
    assert label == "random(seed=3)"


INITS = {n: getattr(torch.nn.init, n) for n in models.DRAWING_INITS}


@pytest.mark.parametrize("name", ["tiny", "vit_b"])
def test_skipped_inits_change_no_value(name):
    """load_model builds without the drawing initialisers: every parameter and buffer is what the official init
    followed by `randomize` gives, bit for bit."""
    fast = models.load_model(name, weights="random", seed=3)
    full = models.randomize(models.build(name), seed=3)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), full.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fast.buffers(), full.buffers(), strict=True))
    assert {n: getattr(torch.nn.init, n) for n in models.DRAWING_INITS} == INITS  # put back after the build
