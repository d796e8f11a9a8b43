"""Published figures (published.toml): per plan step, model and batch size, with the hardware they ran on."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("published.toml")
OWN_MODELS = ("tiny",)  # samrepro's own models: no source measured them


@dataclass(frozen=True)
class Figure:
    """One published number set for one step: img/s and mIoU where the source gives them, and the speed-up over
    the same source's fp32 at the same batch size (given by the source, or computed from its two img/s)."""

    source: str
    hardware: str
    device: str  # "cuda" or "cpu": the kind of device the source ran on
    url: str
    batch_size: int
    img_s: float | None
    miou: float | None
    speedup: float | None


@functools.cache
def load(path: Path = DATA) -> dict[str, Any]:
    return tomllib.loads(Path(path).read_text())


def sources() -> dict[str, dict[str, Any]]:
    return load()["sources"]


def unmeasured(step: str) -> str | None:
    """Why no source has a figure of its own for `step`, where that is known."""
    return load()["unmeasured"].get(step)


def figures(step: str, model: str, batch_size: int, device: str = "") -> list[Figure]:
    """One figure per source that measured `step` on `model`, at its batch size nearest `batch_size` (ties go to
    the larger); with `device`, only sources that ran on that kind of device (an A100's speed-ups say little
    about a CPU run, and the other way round)."""
    out = []
    for name, src in sources().items():
        rows = {int(bs): steps for bs, steps in src.get(model, {}).items() if step in steps}
        if not rows:
            continue
        bs = min(rows, key=lambda b: (abs(b - batch_size), -b))
        row = rows[bs][step]
        speedup = row.get("speedup")
        fp32 = src[model][str(bs)].get("fp32", {}).get("img_s")
        if speedup is None and fp32 and row.get("img_s") is not None:
            speedup = row["img_s"] / fp32
        out.append(
            Figure(name, src["hardware"], src["device"], src["url"], bs, row.get("img_s"), row.get("miou"), speedup)
        )
    return [f for f in out if not device or f.device == device_kind(device)]


def device_kind(device: str) -> str:
    """The kind of a device name (cuda:1 -> cuda): the published sources name only the kind."""
    return device.split(":")[0]


def models() -> set[str]:
    """Models some source has figures for."""
    return {m for src in sources().values() for m, v in src.items() if isinstance(v, dict)}
