"""nox sessions: tests, gates, ablate, sweep, report, ui; each ablation-side session is one line calling the CLI."""

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


@nox.session(reuse_venv=True)
def ablate(session: nox.Session) -> None:
    """`nox -s ablate -- vit_b cuda [--plan blog ...]`; no arguments: tiny on cuda (blog-ro) if a GPU is here, else cpu."""
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
    # tiny is launch-bound: CUDA graphs without autotuning (blog-ro) is what helps it, and max-autotune's
    # minutes of GEMM tuning bought nothing (reports/2026-12-04-h200-named-commands)
    return ["tiny", "cuda", "--plan", "blog-ro"] if cuda else ["tiny", "cpu", "--plan", "cpu"]
