"""The ``robustcnn`` command and its subcommands.

``robustcnn run [overrides]`` hands the rest of the command line to Hydra (so ``-m``, ``--cfg job``,
``--help`` and every override syntax work as Hydra documents them). Errors a user can fix arrive as
:class:`RobustCNNError` and leave as one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from robustcnn import __version__
from robustcnn.errors import RobustCNNError

PROG = "robustcnn"


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit (results already written stay where they are)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _quiet_libraries() -> None:
    """Keep third-party chatter (alembic migrations, mlflow notices) out of the user's terminal."""
    for name in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def summary_line(results: dict, output_dir: str) -> str:
    """The one line a finished job prints (key=value pairs, easy to grep and to parse)."""
    parts = [f"clean_accuracy={results['clean_accuracy']:.4f}"]
    if "reference_robust_accuracy" in results:
        parts.append(
            f"robust_accuracy@{results['reference_eps']:.4g}={results['reference_robust_accuracy']:.4f}"
        )
        parts.append(f"verdict={results['verdict'].replace(' ', '_')}")
    parts += [f"{key}={results[key]}" for key in ("model", "data", "defense", "cache_hit")]
    parts += [f"run_id={results['mlflow_run_id']}", f"results={output_dir}/results.json"]
    return " ".join(parts)


def cmd_run(hydra_args: Sequence[str]) -> None:
    """Run one job (or a multirun with -m) through Hydra."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from robustcnn.config import conf_dir

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _job(cfg: DictConfig) -> float:
        _quiet_libraries()
        from robustcnn.runner import run_job

        try:
            output_dir = HydraConfig.get().runtime.output_dir
            results = run_job(cfg, output_dir=output_dir, progress=sys.stderr.isatty())
        except RobustCNNError as exc:
            fail(str(exc), exc.exit_code)
        print(summary_line(results, output_dir))
        return float(results["clean_accuracy"])

    saved_argv = sys.argv
    sys.argv = [f"{PROG} run", *hydra_args]
    try:
        _job()
    except SystemExit as exc:
        # Hydra reports a config it cannot compose (unknown choice, bad override syntax) with the
        # valid options and exit code 1; in robustcnn's codes that is bad input: 2
        raise SystemExit(2 if exc.code == 1 else exc.code) from None
    finally:
        sys.argv = saved_argv


def cmd_list() -> None:
    """Print every config group with its choices, and the registered datasets and models."""
    from robustcnn.config import conf_dir, config_groups
    from robustcnn.data import available_datasets
    from robustcnn.models import available_models

    print(f"configs: {conf_dir()}")
    for group, choices in config_groups().items():
        print(f"  {group}: {', '.join(choices)}")
    print(f"datasets: {', '.join(available_datasets())}")
    print(f"models: {', '.join(available_models())}")


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
            cmd_list()
        else:
            parser.print_help()
            raise SystemExit(2 if args else 0)
    except RobustCNNError as exc:
        fail(str(exc), exc.exit_code)


if __name__ == "__main__":
    main()
