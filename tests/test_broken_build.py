"""The command line exits 1 on a build with a broken patch and 0 on the same build unbroken.

The broken build is this source tree copied with `benchmarks/broken/sdpa-scale.diff` applied (attention scaled by
1/d instead of 1/sqrt(d)), run through the real CLI and its step processes, as a user would meet it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["ablate", "tiny", "cpu", "--patches", "sdpa", "--images", "2", "--no-track"]


def build(tmp_path: Path, broken: bool) -> Path:
    tree = tmp_path / ("broken" if broken else "intact")
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if broken:
        diff = ROOT / "benchmarks" / "broken" / "sdpa-scale.diff"
        subprocess.run(["git", "apply", str(diff)], cwd=tree, check=True)
    return tree


def ablate(tree: Path, tmp_path: Path) -> subprocess.Popen:
    """The command on `tree`, started; each build has its own cache and results, so both can run at once."""
    env = os.environ | {"PYTHONPATH": str(tree / "src"), "SAMREPRO_CACHE": str(tmp_path / f"cache-{tree.name}")}
    results = tmp_path / f"results-{tree.name}"
    return subprocess.Popen(
        [sys.executable, "-m", "samrepro.cli", *COMMAND, "--results", str(results)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_broken_patch_fails_the_command_and_the_intact_one_passes(tmp_path):
    running = [ablate(build(tmp_path, broken=b), tmp_path) for b in (True, False)]  # side by side: about half the time
    broken, intact = (finished(p) for p in running)
    assert broken.returncode == 1, broken.stderr
    assert "step 01 sdpa:" in broken.stderr and "gate FAIL" in broken.stderr
    assert "embedding_sqnr_db" in broken.stderr  # the gate that caught it names the measure

    assert intact.returncode == 0, intact.stderr
    assert "gate PASS" in intact.stderr and "every gate passed" in intact.stderr
