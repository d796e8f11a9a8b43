"""Shared fixtures: the device under test and the fp32 tiny reference model."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from samrepro.models import TINY_WEIGHTS, fp32_reference_mode, load_model
from samrepro.workload import Sample

# The suite draws the same examples on every run, so a tail example cannot pass one CI run and fail the next;
# `--hypothesis-profile=explore` draws new ones, to look for what the fixed draw misses.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("samrepro", deadline=None, suppress_health_check=_QUIET, derandomize=True)
settings.register_profile("explore", deadline=None, suppress_health_check=_QUIET)
settings.load_profile("samrepro")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device the gates run on: cpu or cuda")


# The plan.json a runner writes (abridged), for tests of what reads a results folder.
PLAN_INFO = {
    "plan": {"name": "blog", "steps": []},  # the runner writes the whole plan
    "plan_hash": "h1",
    "mode": "cumulative",
    "model": "tiny",
    "device": "cpu",
    "batch_size": 2,
    "images": 4,
    "weights": "random(seed=0)",
}


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    dev = request.config.getoption("--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.exit("--device cuda given but torch.cuda.is_available() is False", returncode=2)
    fp32_reference_mode()
    return dev


@pytest.fixture(scope="session")
def tiny_ref(device: str):
    """The fp32 tiny model: shipped trained weights when present, else seeded random ones."""
    weights = None if TINY_WEIGHTS.exists() else "random"
    sam = load_model("tiny", device=device, weights=weights)
    return sam


@pytest.fixture(scope="module")
def fp32_model():
    """Seeded random-weight tiny model; tests change deep copies of it (the `sam` fixture)."""
    return load_model("tiny", weights="random")


@pytest.fixture
def sam(fp32_model):
    return copy.deepcopy(fp32_model)


@pytest.fixture(scope="module")
def step_env(tmp_path_factory):
    """For a module whose tests spawn step processes: a fresh samrepro cache, one thread per process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMREPRO_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def make_samples(seed: int, batch_size: int, max_prompts: int, boxes: bool, multi_point: bool) -> list[Sample]:
    """Synthetic images with prompts drawn from their objects' visible masks."""
    from samrepro.data.synthetic import make_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(batch_size):
        image, masks = make_image(rng)
        masks = [m for m in masks if m.any()][:max_prompts]
        pts, labels, box_list = [], [], []
        for m in masks:
            ys, xs = np.nonzero(m)
            picks = rng.integers(0, len(xs), size=3 if multi_point else 1)
            p = np.stack([xs[picks], ys[picks]], axis=-1).astype(np.float32)  # P, 2
            lab = np.ones(len(picks), dtype=np.int64)
            if multi_point:
                lab[-1] = 0  # one background-labelled point
            pts.append(p)
            labels.append(lab)
            box_list.append([xs.min(), ys.min(), xs.max(), ys.max()])
        out.append(
            Sample(
                image=image,
                points=np.stack(pts) if pts else None,
                labels=np.stack(labels) if labels else None,
                boxes=np.asarray(box_list, dtype=np.float32) if boxes and box_list else None,
                gt_masks=np.stack(masks) if masks else None,
                image_id=i,
            )
        )
    return out


def interpreted_child(script: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `python script OUT.json` with TRITON_INTERPRET=1 and return the JSON it wrote. The interpreter is chosen
    when a kernel is decorated, and the pytest process may already hold (or need) the compiled kernel."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("interp") / "checks.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, script, str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
