"""`samrepro` command line: argument parsing only; the work is in runner, report, tracking and patch_table."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from samrepro.inputs import DEVICES, UsageError
from samrepro.lock import FolderLocked
from samrepro.models import MODELS
from samrepro.plans import MODES, PlanError
from samrepro.supervise import Interrupted

# as samrepro.workloads.NAMES (a test checks), without importing the workloads here
WORKLOADS = ("points", "amg", "interactive")
AMG_OPTIONS = ("points_per_side", "points_per_batch", "crop_n_layers")


class Parser(argparse.ArgumentParser):
    """Bad input: one line on stderr, exit 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> Parser:
    parser = Parser(prog="samrepro", description="Segment Anything, Fast as gated, reversible patches.")
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    ab = sub.add_parser("ablate", help="run a plan of patches, one fresh process per step", parents=[common])
    ab.add_argument("model", choices=MODELS)
    ab.add_argument("device", help=f"{' or '.join(DEVICES)} (or cuda:N)")
    which = ab.add_mutually_exclusive_group()
    which.add_argument(
        "--plan", help="plan in ablations/ or a .toml path (default: blog on cuda, cpu on cpu; amg for --workload amg)"
    )
    which.add_argument("--patches", type=names, help="a,b: fp32, then +a, then +a+b; each must be able to run here")
    ab.add_argument("--mode", choices=MODES, default="cumulative")
    ab.add_argument("--batch-size", type=positive, help="images per encoder batch (default 8; points workload)")
    ab.add_argument("--images", type=positive, default=32)
    ab.add_argument("--prompts", type=positive, help="at most this many prompts per image (default: all)")
    ab.add_argument(
        "--workload",
        choices=WORKLOADS,
        default=WORKLOADS[0],
        help="points: each image's point prompts (default); amg: the automatic mask generator on every image; "
        "interactive: batch 1, each prompt decoded alone (click latency)",
    )
    amg = ab.add_argument_group("--workload amg (the official generator's defaults unless given)")
    amg.add_argument("--points-per-side", type=positive, help="grid points per image side (default 32)")
    amg.add_argument("--points-per-batch", type=positive, help="grid points per decoder call (default 64)")
    amg.add_argument("--crop-n-layers", type=nonnegative, help="layers of image crops decoded again (default 0)")
    ab.add_argument(
        "--weights", help="'official', 'random' or a checkpoint path (default: shipped for tiny, official for vit_*)"
    )
    ab.add_argument(
        "--data",
        default="synthetic",
        help="synthetic, coco (after `samrepro data fetch coco`), coco:DIR or noise[:P] (1024px noise, P points each)",
    )
    ab.add_argument(
        "--results",
        type=Path,
        help="results folder (default: results/MODEL-DEVICE-PLAN-MODE-bsB, -amg-ppsN or -interactive)",
    )
    ab.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the working directory)")
    ab.add_argument("--force", action="store_true", help="rerun steps whose results exist")
    ab.add_argument("--profile", action="store_true", help="a torch.profiler trace per step under RESULTS/traces/")
    ab.add_argument("--no-track", action="store_true", help="do not log to MLflow")

    sw = sub.add_parser("sweep", help="run a matrix of ablations as Ray tasks, here or on a cluster", parents=[common])
    sw.add_argument("sweep", help="a sweep file (.toml) or the name of one in ablations/sweeps/ (docs/sweep.md)")
    sw.add_argument("--results", type=Path, help="results folder (default: the sweep file's, else results/sweeps/NAME)")
    sw.add_argument("--ray-address", help="a Ray cluster this node is in: auto or HEAD:6379 (default: a new local one)")
    sw.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the working directory)")
    sw.add_argument("--force", action="store_true", help="rerun steps whose results exist")
    sw.add_argument("--no-track", action="store_true", help="do not log to MLflow")

    rep = sub.add_parser("report", help="markdown report with charts from a results folder", parents=[common])
    rep.add_argument("results_dir", type=Path)

    log = sub.add_parser("log", help="log a results folder to MLflow", parents=[common])
    log.add_argument("results_dir", type=Path)
    log.add_argument("--tracking-uri")

    ui = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 over the default tracking store", parents=[common])
    ui.add_argument("--port", type=positive, default=5000)
    ui.add_argument("--tracking-uri")

    pat = sub.add_parser("patches", help="registered patches, their tolerances and availability here", parents=[common])
    pat.add_argument("--markdown", action="store_true", help="the README's table instead (the same on every machine)")

    fetch = sub.add_parser("weights", help="download and verify official checkpoints into the cache", parents=[common])
    fetch.add_argument("action", choices=["fetch"])
    fetch.add_argument("models", nargs="+", choices=["vit_b", "vit_l", "vit_h"])
    fetch.add_argument("--cache-dir", type=Path, help="default: $SAMREPRO_CACHE/checkpoints or ~/.cache/samrepro/...")

    data = sub.add_parser("data", help="download, verify and extract a dataset into the cache", parents=[common])
    data.add_argument("action", choices=["fetch"])
    data.add_argument("dataset", choices=["coco"], help="coco: COCO val2017 images and instance annotations")
    data.add_argument("--cache-dir", type=Path, help="default: $SAMREPRO_CACHE/coco or ~/.cache/samrepro/coco")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, argv)
    except (UsageError, PlanError, FileNotFoundError, FolderLocked) as e:
        if args.debug:
            raise
        print(f"samrepro: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the runner took over the signals
        if args.debug:
            raise
        print("samrepro: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"samrepro: {type(e).__name__}: {e} (--debug for the traceback)", file=sys.stderr)
        return 1


def ablate(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro.runner import run_ablation

    try:
        outcome = run_ablation(
            args.model,
            args.device,
            plan=args.plan,
            patches=args.patches,
            mode=args.mode,
            batch_size=args.batch_size,
            images=args.images,
            prompts=args.prompts,
            weights=args.weights,
            data=args.data,
            results_dir=args.results,
            tracking_uri=args.tracking_uri,
            force=args.force,
            profile=args.profile,
            track=not args.no_track,
            command=shlex.join(["samrepro", *argv]),
            workload=args.workload,
            workload_options={k: v for k in AMG_OPTIONS if (v := getattr(args, k)) is not None},
        )
    except Interrupted as e:
        again = shlex.join(["samrepro", *(a for a in argv if a != "--force")])  # --force would redo finished steps
        print(f"samrepro: {e}; to resume, run: {again}", file=sys.stderr)
        return e.exit_code
    print(outcome.results_dir)
    return outcome.exit_code


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro.sweep import find_sweep, load
    from samrepro.sweep_run import run_sweep

    try:
        outcome = run_sweep(
            load(find_sweep(args.sweep)),
            results_dir=args.results,
            ray_address=args.ray_address,
            force=args.force,
            track=not args.no_track,
            tracking_uri=args.tracking_uri,
            command=shlex.join(["samrepro", *argv]),
        )
    except Interrupted as e:
        again = shlex.join(["samrepro", *(a for a in argv if a != "--force")])
        print(f"samrepro: {e}; to resume, run: {again}", file=sys.stderr)
        return e.exit_code
    print(outcome.results_dir)
    return outcome.exit_code


def report(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro.report import write_report

    _need_dir(args.results_dir)
    print(write_report(args.results_dir))
    return 0


def log(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro import tracking

    _need_dir(args.results_dir)
    try:
        print(tracking.log_results_dir(args.results_dir, args.tracking_uri))
    except tracking.TrackingUnavailable as e:
        print(f"samrepro: tracking unavailable: {e}", file=sys.stderr)
        return 1
    return 0


def ui(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro.tracking import default_tracking_uri, ui_address

    uri = args.tracking_uri or default_tracking_uri(Path.cwd())
    print(f"samrepro: MLflow UI at {ui_address(uri, args.port)}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call([*cmd, "--backend-store-uri", uri])


def patches(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from samrepro import patch_table

    print(patch_table.markdown() if args.markdown else patch_table.text("cuda" if torch.cuda.is_available() else "cpu"))
    return 0


def weights(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro.checkpoints import fetch

    for model in args.models:
        print(fetch(model, args.cache_dir))
    return 0


def data(args: argparse.Namespace, argv: list[str]) -> int:
    from samrepro.data.coco_fetch import fetch_coco

    print(fetch_coco(args.cache_dir))
    return 0


def _need_dir(path: Path) -> None:
    if not path.is_dir():
        raise UsageError(f"results folder not found: {path}")


COMMANDS = {
    "ablate": ablate,
    "sweep": sweep,
    "report": report,
    "log": log,
    "ui": ui,
    "patches": patches,
    "weights": weights,
    "data": data,
}

if __name__ == "__main__":
    sys.exit(main())
