"""nox sessions: tests, gates, bench, ablate, sweep, report, ui; ablation-side sessions are one line calling the CLI."""

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests"]

MODELS = ("tiny", "vit_b", "vit_l", "vit_h")  # as samrepro.models.MODELS (importing it here would need torch)
DEVICES = ("cpu", "cuda")
USAGE = (
    "usage: nox -s ablate -- MODEL DEVICE [samrepro ablate options], MODEL in tiny|vit_b|vit_l|vit_h, DEVICE cpu|cuda"
)


@nox.session
def tests(session: nox.Session) -> None:
    """pytest on CPU (tests marked cuda or heavy excluded), then ruff; with Ray, so the sweep is tested too."""
    session.install("-e", ".[dev,ray]")
    session.run("pytest", "-m", "not cuda and not heavy", *session.posargs)
    session.run("ruff", "check", "src", "tests", "tools")


@nox.session
def gates(session: nox.Session) -> None:
    """The equivalence gates on one device: `nox -s gates -- cuda` (default cpu)."""
    session.install("-e", ".[dev]")
    device = session.posargs[0] if session.posargs else "cpu"
    gate_tests = ["tests/test_gates.py", "tests/test_gates_can_fail.py", "tests/test_sync_free_cuda.py"]
    session.run("pytest", *gate_tests, "--device", device, *session.posargs[1:])


# A microbenchmark fails when its median is this much slower than in the stored baseline (docs/benchmarks.md: why).
BENCH_FAIL = {"cpu": "median:100%", "cuda": "median:15%"}


@nox.session(reuse_venv=True)
def bench(session: nox.Session) -> None:
    """Microbenchmarks against this machine's stored baseline: `nox -s bench -- [cpu|cuda] [--record] [pytest args]`."""
    session.install("-e", ".[dev]")
    args = list(session.posargs)
    device = args.pop(0) if args and args[0] in DEVICES else "cpu"
    record = "--record" in args
    args = [a for a in args if a != "--record"]
    found = session.run("python", "benchmarks/micro/baseline.py", device, silent=True)
    if found is None:  # --install-only: nothing runs
        return
    baseline, *timing = found.strip().splitlines()  # the path, then the timing options (benchmarks/micro/baseline.py)
    if record:
        session.run("pytest", *timing, f"--benchmark-json={baseline}", *args)
        return
    if not os.path.exists(baseline):
        session.error(f"no baseline for this machine ({baseline}): record one with `nox -s bench -- {device} --record`")
    os.makedirs("results/bench", exist_ok=True)
    latest = os.path.join("results/bench", os.path.basename(baseline))
    compare = [f"--benchmark-compare={baseline}", f"--benchmark-compare-fail={BENCH_FAIL[device]}"]
    session.run("pytest", *timing, f"--benchmark-json={latest}", *compare, *args)


@nox.session(reuse_venv=True)
def ablate(session: nox.Session) -> None:
    """`nox -s ablate -- vit_b cuda [--plan blog ...]`; no arguments: tiny on cuda (tiny-cuda) with a GPU, else cpu."""
    args = session.posargs
    if args and (len(args) < 2 or args[0] not in MODELS or args[1].split(":")[0] not in DEVICES):
        session.error(USAGE)
    session.install("-e", ".")
    session.run("samrepro", "ablate", *(args or _default_ablation(session)))


@nox.session(reuse_venv=True)
def sweep(session: nox.Session) -> None:
    """`nox -s sweep -- SWEEP.toml [samrepro sweep options]`, or a shipped sweep's name: `-- tiny-cpu`."""
    if not session.posargs:
        session.error("usage: nox -s sweep -- SWEEP.toml|NAME [--ray-address ADDRESS] [samrepro sweep options]")
    session.install("-e", ".[ray]")
    session.run("samrepro", "sweep", *session.posargs)


@nox.session(reuse_venv=True)
def report(session: nox.Session) -> None:
    """`nox -s report -- RESULTS_DIR`."""
    if len(session.posargs) != 1:
        session.error("usage: nox -s report -- RESULTS_DIR")
    session.install("-e", ".")
    session.run("samrepro", "report", *session.posargs)


@nox.session(reuse_venv=True)
def ui(session: nox.Session) -> None:
    """MLflow UI on 127.0.0.1 over the project's tracking store (`-- --port N` to move it)."""
    session.install("-e", ".")
    session.run("samrepro", "ui", *session.posargs)


def _default_ablation(session: nox.Session) -> list[str]:
    probe = "import torch; print(torch.cuda.is_available())"
    out = session.run("python", "-c", probe, silent=True)  # None under --install-only: nothing runs then
    cuda = (out or "").strip().endswith("True")
    # tiny is launch-bound: batched decoding and CUDA graphs help it, the blog's attention kernels and autotuning
    # cost it time (ablations/tiny-cuda.toml; reports/2026-12-05-h200-tiny-cuda-default)
    return ["tiny", "cuda", "--plan", "tiny-cuda"] if cuda else ["tiny", "cpu", "--plan", "cpu"]
