"""A patch from the user's own module: listed, run and gated by the real CLI like a built-in one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from samrepro.registry import MODULES_ENV

MODULE = '''
from dataclasses import dataclass
from types import MethodType

import torch

from samrepro.patch import EXACT, Patch, PatchConfig, Tolerance
from samrepro.registry import register_patch


@dataclass(frozen=True)
class NoConfig(PatchConfig):
    pass


def _quiet(sam, config, undo):
    """Exact: the encoder's output (through whatever forward it has now) times one."""
    enc = sam.image_encoder
    inner = enc.forward

    def forward(self, x):
        return inner(x) * 1.0

    undo.setattr(enc, "forward", MethodType(forward, enc))


def _noisy(sam, config, undo):
    """Broken on purpose: noise on the image embeddings (about 26 dB)."""
    enc = sam.image_encoder

    def forward(self, x):
        y = type(self).forward(self, x)
        return y + 0.05 * y.std() * torch.randn_like(y)

    undo.setattr(enc, "forward", MethodType(forward, enc))


register_patch(Patch("my_exact", "a researcher's exact patch", NoConfig, _quiet, EXACT))
register_patch(
    Patch("my_noisy", "a researcher's broken patch", NoConfig, _noisy, Tolerance(0.9, 0.05, 40.0, 0.05)),
    before="bf16",
)
'''


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {MODULES_ENV: "my_patches", "PYTHONPATH": str(tmp_path), "SAMREPRO_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "samrepro.cli", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_outside_patches_are_listed_run_and_gated(tmp_path):
    (tmp_path / "my_patches.py").write_text(MODULE)
    listed = cli(tmp_path, "patches")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert names[0] == "my_noisy" and names.index("my_exact") == names.index("compile") - 1

    run = cli(tmp_path, "ablate", "tiny", "cpu", "--patches", "my_exact,my_noisy", "--images", "2", "--no-track")
    assert run.returncode == 1, run.stderr
    assert "step 01 my_exact:" in run.stderr and "agreement 1.0000, gate PASS" in run.stderr
    failed = next(line for line in run.stderr.splitlines() if line.startswith("step 02 my_noisy: ") and "img/s" in line)
    assert "gate FAIL" in failed and "embedding_sqnr_db" in failed


def test_a_module_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "my_patches.py").write_text("raise RuntimeError('typo in my patch')")
    listed = cli(tmp_path, "patches")
    assert listed.returncode == 1
    assert "SAMREPRO_PATCHES: module 'my_patches' failed to import: RuntimeError: typo in my patch" in listed.stderr
