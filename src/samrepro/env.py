"""The environment a result was measured in: versions, hardware, repo state, flags (no hostname)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from samrepro.plans import hash_plan

PACKAGES = ("torch", "torchvision", "triton", "torchao", "segment-anything", "mlflow", "numpy")
ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCH_", "PYTORCH_", "SAMREPRO_", "TRITON_")
ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def capture(plan: dict | None = None) -> dict[str, Any]:
    """A JSON-able record of this process's environment; with the plan and its hash when given."""
    package = Path(__file__).resolve().parent
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": {name: _version(name) for name in PACKAGES} | {"torch": torch.__version__},  # + local tag
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": _gpu(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen's CPU kernels use
        "cpu_bf16": _cpu_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "env_vars": {k: v for k, v in sorted(os.environ.items()) if k in ENV_NAMES or k.startswith(ENV_PREFIXES)},
        **_git(package),
        "source_sha256": source_digest(package),
    }
    if plan is not None:
        env["plan"], env["plan_hash"] = plan, hash_plan(plan)
    return env


def inductor_cache(cache_root: Path, device: str) -> Path:
    """samrepro's inductor cache (compiled kernels, autotuning results), one per torch, Triton and hardware.

    Step processes share it, so a step does not tune again what an earlier step or run already tuned.
    """
    hardware = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    key = f"torch-{torch.__version__}-triton-{_version('triton')}-{hardware}"
    return cache_root / "inductor" / "".join(c if c.isalnum() or c in ".-+" else "_" for c in key)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    props = torch.cuda.get_device_properties(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "memory_mib": props.total_memory >> 20,
        "count": torch.cuda.device_count(),
    }


def _cpuinfo(key: str) -> str | None:
    """The first processor's `key` field in /proc/cpuinfo; None where the file or the field is not there."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def _cpu_model() -> str | None:
    return _cpuinfo("model name") or platform.processor() or None


def _cpu_bf16() -> bool | None:
    """Whether the CPU has bf16 instructions (AVX512_BF16 or AMX_BF16); None where /proc/cpuinfo is not there."""
    flags = _cpuinfo("flags")
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def source_digest(package: Path) -> str:
    """SHA-256 of the package's files (paths and contents; compiled bytecode left out): which code ran, also where
    the checkout's git state does not say (a copy of a working tree, an installed wheel, uncommitted changes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _git(folder: Path) -> dict[str, Any]:
    """Commit and dirty flag (tracked files changed) of the checkout holding this package; None outside one."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}
