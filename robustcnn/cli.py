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
from pathlib import Path

from robustcnn import __version__
from robustcnn.errors import RobustCNNError
from robustcnn.interrupts import catch_interrupts, raise_if_requested
from robustcnn.launchers import launcher_failure, quiet_schema_matching
from robustcnn.preflight import check_run_arguments, is_multirun

PROG = "robustcnn"

# Our launcher presets share their names with the plugins' schemas on purpose (robustcnn.launchers);
# set at import because sweep workers (joblib, submitit) import this module before they compose.
quiet_schema_matching()


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
    if results.get("task") == "face_patch":
        parts = [
            f"{key}={results[key]:.4f}"
            for key in ("dodging_success_rate", "impersonation_success_rate", "random_patch_success_rate")
            if isinstance(results.get(key), (int, float))
        ]
        parts += [f"threshold={results['threshold']:.4f}"]
        parts += [f"{key}={results[key]}" for key in ("model", "data")]
        parts += [f"run_id={results['mlflow_run_id']}", f"results={output_dir}/results.json"]
        return " ".join(parts)
    parts = [f"clean_accuracy={results['clean_accuracy']:.4f}"]
    if "reference_robust_accuracy" in results:
        parts.append(
            f"robust_accuracy@{results['reference_eps']:.4g}={results['reference_robust_accuracy']:.4f}"
        )
        parts.append(f"verdict={results['verdict'].replace(' ', '_')}")
    defense = str(results.get("defense_label") or results["defense"]).replace(" ", ",")  # one token
    parts += [f"model={results['model']}", f"data={results['data']}", f"defense={defense}"]
    parts.append(f"cache_hit={results['cache_hit']}")
    if results.get("reused_from"):
        parts.append(f"reused_from={results['reused_from']}")
    parts += [f"run_id={results['mlflow_run_id']}", f"results={output_dir}/results.json"]
    return " ".join(parts)


def cmd_run(hydra_args: Sequence[str]) -> None:
    """Run one job (or a multirun with -m) through Hydra."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from robustcnn.config import conf_dir

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _job(cfg: DictConfig) -> float:
        _quiet_libraries()
        from robustcnn.progress import progress_enabled
        from robustcnn.runner import run_job
        from robustcnn.sweep import SweepLink, defense_label, job_tags

        hydra_cfg = HydraConfig.get()
        output_dir = hydra_cfg.runtime.output_dir
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        try:
            results = run_job(
                cfg,
                output_dir=output_dir,
                progress=progress_enabled(),
                sweep=SweepLink.find(hydra_cfg.sweep.dir) if multirun else None,
                job_tags=job_tags(hydra_cfg) if multirun else None,
                defense_label=defense_label(hydra_cfg),
            )
        except RobustCNNError as exc:
            fail(str(exc), exc.exit_code)
        print(summary_line(results, output_dir))
        return float(results.get("clean_accuracy", results.get("dodging_success_rate")) or 0.0)

    from robustcnn.sweep import SweepFailed, close_open_sweeps

    check_run_arguments(hydra_args)
    check_composed_config(hydra_args)
    saved_argv = sys.argv
    sys.argv = [f"{PROG} run", *hydra_args]
    # SIGTERM ends a job like Ctrl-C (runs KILLED, finished results kept), and neither can be lost
    with catch_interrupts():
        status = "FAILED"
        try:
            _job()
            raise_if_requested()  # a stop Python discarded in a callback (robustcnn.interrupts)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            fail("interrupted; finished jobs are kept (re-run the same command to compute the rest)", 130)
        except Exception as exc:
            # with submitit and Ray, a failed job (or a bad override) arrives here as an exception
            # (robustcnn.launchers): one error line, with the job's log, instead of a stack trace
            message = launcher_failure(exc)
            if message is None:
                raise
            fail(message)
        except SweepFailed:
            raise  # the sweep ran; some job did not finish (already said, exit 1)
        except SystemExit as exc:
            # Hydra reports a config it cannot compose (unknown choice, bad override syntax) with the
            # valid options and exit code 1; in robustcnn's codes that is bad input: 2
            raise SystemExit(2 if exc.code == 1 else exc.code) from None
        finally:
            # a sweep whose job failed never reaches Hydra's end callback: end its parent run here
            close_open_sweeps("FAILED" if status == "FINISHED" else status)
            sys.argv = saved_argv


#: Hydra options that take a value (the next argument); the rest of the command line is overrides.
_VALUE_OPTIONS = {
    "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"
}  # fmt: skip
#: Options after which Hydra does not run a job (help, config printing, shell completion).
_NO_JOB_OPTIONS = {
    "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"
}  # fmt: skip


def _first_cell(overrides: Sequence[str]) -> list[str] | None:
    """The overrides of a sweep's first job (``seed=0,1`` -> ``seed=0``); None if Hydra cannot parse them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None  # Hydra reports its own syntax errors (with the grammar) when it starts
    first = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()), None)
            if value is None:
                return None
            first.append(f"{override.get_key_element()}={value}")
        else:
            first.append(text)
    return first


def check_composed_config(hydra_args: Sequence[str]) -> None:
    """Compose the job's config (a sweep's first job) and run the job's checks before Hydra starts.

    Why: a bad value would otherwise surface inside the job, after Hydra created the output folder
    (and, for a sweep, an MLflow parent run); and a few malformed overrides (``training=[1]``) make
    Hydra itself fail with a traceback. Composition errors Hydra reports well (an unknown choice,
    override syntax) are left to it: its message lists the valid choices.
    """
    if any(arg in _NO_JOB_OPTIONS or arg.split("=", 1)[0] in _VALUE_OPTIONS for arg in hydra_args):
        return  # help/printing, or a user's own config folder: Hydra's own path
    multirun = is_multirun(hydra_args)
    overrides = _first_cell([a for a in hydra_args if not a.startswith("-")])
    if overrides is None:
        return
    from hydra.errors import HydraException

    from robustcnn.config import compose
    from robustcnn.runner import check_config, to_container

    try:
        cfg = compose(overrides)
    except HydraException:
        return  # an unknown choice or a bad override: Hydra says so, listing the options
    except Exception as exc:  # what Hydra does not catch itself (e.g. a list given to a group)
        detail = " ".join(str(exc).split())[:200]
        fail(f"the overrides {' '.join(overrides)} cannot be composed ({type(exc).__name__}: {detail}); "
             "check each group=choice and key=value (`robustcnn run --help` lists the groups)")
    check_config(to_container(cfg), device=not multirun)


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


def cmd_report(ns: argparse.Namespace) -> None:
    """Build the HTML dashboard of one experiment (or all) from the MLflow store; print the paths."""
    from robustcnn.report import build_report
    from robustcnn.tracking import resolve_tracking_uri

    _quiet_libraries()
    uri = ns.tracking_uri or resolve_tracking_uri(None)
    for path in build_report(uri, ns.experiment, Path(ns.out)):
        print(path)


def cmd_ui(ns: argparse.Namespace) -> None:
    """Serve the MLflow UI on the project's store (robustcnn.ui), 127.0.0.1 unless --host says otherwise."""
    from robustcnn.tracking import resolve_tracking_uri
    from robustcnn.ui import serve

    serve(ns.tracking_uri or resolve_tracking_uri(None), ns.host, ns.port)


def cmd_audit(ns: argparse.Namespace) -> None:
    """Audit one model file or MLflow model; the exit code is the verdict (robustcnn.audit.run)."""
    from robustcnn.audit.run import output_folder_of, run_audit, summary_line
    from robustcnn.progress import progress_enabled

    _quiet_libraries()
    try:
        with catch_interrupts():
            code, results = run_audit(ns.model, ns.overrides, progress=progress_enabled())
            raise_if_requested()
    except KeyboardInterrupt:
        fail("interrupted; files already written are kept", 130)
    except RobustCNNError:
        raise
    except Exception as exc:  # an untrusted model can fail anywhere: one line, never a traceback
        if os.environ.get("ROBUSTCNN_DEBUG"):
            raise
        fail(
            f"the audit stopped: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(set ROBUSTCNN_DEBUG=1 for the traceback and report it if the model is valid)"
        )
    print(summary_line(results, output_folder_of(results)))
    raise SystemExit(code)


def cmd_sync(ns: argparse.Namespace) -> None:
    """Import jobs whose tracking store failed while they ran (robustcnn.sync); exit 1 if any is damaged."""
    from robustcnn.sync import sync

    _quiet_libraries()
    outcomes = sync(ns.paths, ns.tracking_uri)
    for outcome in outcomes:
        print(outcome.line())
    count = {s: sum(o.status == s for o in outcomes) for s in ("imported", "present", "damaged")}
    print(
        f"sync: {count['imported']} imported, {count['present']} already present, {count['damaged']} damaged"
    )
    if count["damaged"]:
        raise SystemExit(1)


def cmd_assets(ns: argparse.Namespace) -> None:
    """Fetch, verify and convert the face-recognition assets (robustcnn.assets); print where they are."""
    from robustcnn.assets import fetch_face_api

    print(fetch_face_api(dest=ns.dir, tarball=ns.tarball, force=ns.force))


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
        description="Exit codes: 0 audited (gate passed or none), 1 below audit.min_robust_accuracy, "
        "2 bad input, 3 unreliable evaluation (a sanity check failed).",
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
        help="import jobs that finished while the MLflow store was unreachable (their results.json)",
        description="Safe to repeat: jobs already in the store are skipped (each lands exactly once).",
    )
    sync.add_argument("paths", nargs="+", help="job or sweep output folders (outputs/..., multirun/...)")
    sync.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: the one each job was meant for)"
    )
    assets = sub.add_parser(
        "assets",
        help="fetch and convert the pretrained face recognizer (npm @vladmandic/face-api, sha256-pinned)",
        description="Downloads the package with `npm pack` (or takes --tarball), verifies its sha256, "
        "extracts the models, sample photos and licence, and converts the weights to safetensors. "
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
            cmd_list()
        elif ns.command == "report":
            cmd_report(ns)
        elif ns.command == "ui":
            cmd_ui(ns)
        elif ns.command == "audit":
            cmd_audit(ns)
        elif ns.command == "sync":
            cmd_sync(ns)
        elif ns.command == "assets":
            cmd_assets(ns)
        else:
            parser.print_help()
            raise SystemExit(2 if args else 0)
    except RobustCNNError as exc:
        fail(str(exc), exc.exit_code)


if __name__ == "__main__":
    # `python -m robustcnn.cli`: run the imported module, not this __main__ copy, so the sweep's task
    # function refers to robustcnn.cli and parallel workers import it (with its warning filter)
    from robustcnn.cli import main as _main

    _main()
