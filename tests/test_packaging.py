"""The wheel a user installs holds every module and the shipped plans and sweeps (a non-editable install finds
them), and none of the repository's tools."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build the wheel")
def test_the_wheel_ships_every_module_plan_and_sweep(tmp_path):
    subprocess.run(["uv", "build", "--wheel", "-q", "-o", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("samrepro-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        f"samrepro/{p.relative_to(ROOT / 'src' / 'samrepro')}" for p in (ROOT / "src" / "samrepro").rglob("*.py")
    }
    plans = {f"samrepro/ablations/{p.relative_to(ROOT / 'ablations')}" for p in (ROOT / "ablations").rglob("*.toml")}
    assert plans and modules - names == set() and plans - names == set()
    assert "samrepro/weights/sam_tiny.safetensors" in names and "samrepro/published.toml" in names
    assert not [n for n in names if n.startswith("tools/")]  # the tiny model's training among them
