"""The timing fixture every microbenchmark goes through, and what a saved run records about the machine."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable

import pytest
import torch

from samrepro.models import fp32_reference_mode

# "TEXT[:N]": benchmarks whose name contains TEXT do their work N times (default 3) per timed call, a real slowdown
# of a component, to watch the comparison with the baseline fail (docs/benchmarks.md). Unset in ordinary runs.
SLOW_ENV = "SAMREPRO_BENCH_SLOW"


# One CPU thread: on a shared 2-core machine with other processes running, two OpenMP threads waiting on each other
# at every barrier made the tiny model's attention 3-20x slower (global: median 23 ms on one thread, 120 on two).
CPU_THREADS = 1


def pytest_configure(config: pytest.Config) -> None:
    """One CPU thread; TF32 off and float32 matmul precision highest, as in every ablation step. Set before
    pytest-benchmark reads the machine info it compares with the baseline's."""
    torch.set_num_threads(CPU_THREADS)
    fp32_reference_mode()


@pytest.fixture
def measure(benchmark, request: pytest.FixtureRequest) -> Callable[[Callable[[], object], str], None]:
    """measure(fn, device): one untimed call (compiles, allocates), then pytest-benchmark's rounds of fn under
    inference mode; on CUDA each call ends with a synchronize, so the clock sees the kernels, not their launch."""
    text, _, times = os.environ.get(SLOW_ENV, "").partition(":")
    repeats = int(times or 3) if text and text in request.node.name else 1

    def run(fn: Callable[[], object], device: str) -> None:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        @torch.inference_mode()
        def timed() -> None:
            for _ in range(repeats):
                fn()
            sync()

        timed()
        benchmark.extra_info["repeats"] = repeats
        benchmark(timed)

    return run


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """What beside the hardware sets the timings: library versions, CPU threads, the GPU."""
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchao", "segment-anything")}
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["samrepro"] = {**versions, "torch_threads": torch.get_num_threads(), "cuda_device": cuda}
