"""Where the stored baseline of a benchmark run lives: one JSON per device and the hardware that sets its timings.

pytest-benchmark's own storage files runs under a machine id of OS, interpreter and word size
(`Linux-CPython-3.11-64bit`), which names neither the CPU nor the GPU and puts CPU and CUDA runs side by side.
Baselines are named here instead, so a run is only ever compared with one from the same hardware:
`benchmarks/baselines/cpu-<CPU model>-<N>cpus.json`, `benchmarks/baselines/cuda-<GPU name>.json`.

`python benchmarks/micro/baseline.py cpu|cuda` prints the path (relative to the repository root), then the pytest
arguments of a timed run on that device, one per line: `nox -s bench` and `benchmarks/device.sh bench` both take them
from here, so a baseline recorded by either compares with a run of the other.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

BASELINES = Path("benchmarks/baselines")  # relative to the repository root, where nox runs
DEVICES = ("cpu", "cuda")


def hardware(device: str) -> str:
    """The CPU model and its logical CPU count, or the GPU's name."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("cuda: torch.cuda.is_available() is False on this machine")
        return torch.cuda.get_device_name()
    return f"{cpu_model()} {os.cpu_count()}cpus"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1]
    return platform.processor() or platform.machine()


def timing_args(device: str) -> list[str]:
    """What every timed run on `device` passes to pytest: the benchmarks, their marker, pytest-benchmark's timing."""
    return [
        "benchmarks/micro", "-m", "cuda" if device == "cuda" else "not cuda",
        "--benchmark-min-time=0.01", "--benchmark-disable-gc",  # rounds of >= 10 ms: short calls are batched
        # CPU time on the CPU: time spent descheduled while other processes run is not the code's (docs/benchmarks.md)
        "--benchmark-timer=" + ("time.perf_counter" if device == "cuda" else "time.process_time"),
        "--benchmark-group-by=func", "--benchmark-sort=name", "--benchmark-columns=median,iqr,min,rounds,iterations",
    ]  # fmt: skip


def baseline_path(device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", hardware(device).lower()).strip("-")
    return BASELINES / f"{device}-{slug}.json"


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in DEVICES:
        raise SystemExit(f"usage: python {sys.argv[0]} {'|'.join(DEVICES)}")
    print(baseline_path(sys.argv[1]), *timing_args(sys.argv[1]), sep="\n")
