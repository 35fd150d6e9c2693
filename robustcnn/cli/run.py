"""``robustcnn run``: one job, or a sweep with ``-m``, through Hydra.

Why the checks before Hydra: a bad value would otherwise surface inside the job, after Hydra created
the output folder (and, for a sweep, an MLflow parent run). The job's config is composed and checked
here first (a sweep's first cell), and Hydra runs only what passed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from robustcnn.cli.arguments import check_run_arguments, is_multirun
from robustcnn.cli.output import PROG, fail, quiet_libraries
from robustcnn.config import quiet_schema_matching
from robustcnn.errors import RobustCNNError
from robustcnn.interrupts import catch_interrupts, raise_if_requested
from robustcnn.sweeps.launchers import launcher_failure

# Our launcher presets share their names with the plugins' schemas on purpose (robustcnn.sweeps.launchers);
# set at import because sweep workers (joblib, submitit) import this module (the task function's) before
# they compose.
quiet_schema_matching()


#: The face figures of the summary line: in sample (only the transforms held out), then on held-out photos.
FACE_SUMMARY = (
    (
        "transforms_only",
        (
            "dodging_success_rate",
            "impersonation_success_rate",
            "random_patch_success_rate",
            "random_impersonation_success_rate",
        ),
    ),
    (
        "photos",
        (
            "dodging_success_rate_held_out_photos",
            "random_dodging_success_rate_held_out_photos",
            "impersonation_success_rate_held_out_photos",
            "random_impersonation_success_rate_held_out_photos",
        ),
    ),
)


def face_summary_line(results: dict, output_dir: str) -> str:
    """A face job's line: each group of rates followed by ``held_out=`` (what the optimisation never
    saw), the transfer figures followed by ``transfer_held_out=recognizer``, the held-out false-accept
    rate, the baseline check, then where to look."""
    parts = []
    for held_out, keys in FACE_SUMMARY:
        rates = [f"{key}={results[key]:.4f}" for key in keys if isinstance(results.get(key), (int, float))]
        if rates:
            parts += [*rates, f"held_out={held_out}"]
    transfer = [  # each held-out recognizer's figures and random baselines (results.json `transfer`)
        f"{key}={value:.4f}"
        for key, value in sorted(results.items())
        if key.startswith("transfer_") and isinstance(value, float) and "_clean_" not in key
    ]
    if transfer:  # its own marker: the last `held_out=` stays the study's own (parsers read key=value)
        parts += [*transfer, "transfer_held_out=recognizer"]
    if isinstance(results.get("false_accept_rate"), (int, float)):
        parts.append(f"false_accept_rate={results['false_accept_rate']:.4f}")
    parts.append(f"threshold={results['threshold']:.4f}")
    statuses = [c["status"] for c in results.get("checks") or []]
    parts.append("checks=" + ("failed" if "failed" in statuses else "passed" if statuses else "none"))
    parts += [f"{key}={results[key]}" for key in ("model", "data")]
    parts += [f"run_id={results['mlflow_run_id']}", f"results={output_dir}/results.json"]
    return " ".join(parts)


def summary_line(results: dict, output_dir: str) -> str:
    """The one line a finished job prints (key=value pairs, easy to grep and to parse)."""
    if results.get("task") == "face_patch":
        return face_summary_line(results, output_dir)
    parts = [f"clean_accuracy={results['clean_accuracy']:.4f}"]
    if "reference_robust_accuracy" in results:
        parts.append(
            f"robust_accuracy@{results['reference_eps']:.4g}={results['reference_robust_accuracy']:.4f}"
        )
        parts.append(f"verdict={results['verdict'].replace(' ', '_')}")
        parts.append(f"evidence={results.get('evidence', 'unknown')}")
    defense = str(results.get("defense_label") or results["defense"]).replace(" ", ",")  # one token
    parts += [f"model={results['model']}", f"data={results['data']}", f"defense={defense}"]
    parts.append(f"cache_hit={results['cache_hit']}")
    if results.get("reused_from"):
        parts.append(f"reused_from={results['reused_from']}")
    parts += [f"run_id={results['mlflow_run_id']}", f"results={output_dir}/results.json"]
    return " ".join(parts)


#: The error lines of this process's failed jobs: why a sweep stopped (its parent run's close reason).
_job_errors: list[str] = []


def cmd_run(hydra_args: Sequence[str]) -> None:
    """Run one job (or a multirun with -m) through Hydra."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from robustcnn.config import conf_dir

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _job(cfg: DictConfig) -> float:
        quiet_libraries()
        from robustcnn.jobs.dispatch import run_job
        from robustcnn.progress import progress_enabled
        from robustcnn.sweeps.callback import defense_label, job_tags
        from robustcnn.tracking.sweep_link import SweepLink

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
            _job_errors.append(str(exc))
            fail(str(exc), exc.exit_code)
        print(summary_line(results, output_dir))
        return float(results.get("clean_accuracy", results.get("dodging_success_rate")) or 0.0)

    from robustcnn.sweeps.callback import SweepFailed, close_open_sweeps

    check_run_arguments(hydra_args)
    check_composed_config(hydra_args)
    saved_argv = sys.argv
    sys.argv = [f"{PROG} run", *hydra_args]
    # SIGTERM ends a job like Ctrl-C (runs KILLED, finished results kept), and neither can be lost
    _job_errors.clear()
    with catch_interrupts():
        status, reason = "FAILED", None
        try:
            _job()
            raise_if_requested()  # a stop Python discarded in a callback (robustcnn.interrupts)
            status = "FINISHED"
        except KeyboardInterrupt:
            status, reason = "KILLED", "interrupted (Ctrl-C or SIGTERM)"
            fail("interrupted; finished jobs are kept (re-run the same command to compute the rest)", 130)
        except Exception as exc:
            # with submitit and Ray, a failed job (or a bad override) arrives here as an exception
            # (robustcnn.sweeps.launchers): one error line, with the job's log, instead of a stack trace
            message = launcher_failure(exc)
            if message is None:
                raise
            reason = message
            fail(message)
        except SweepFailed:
            raise  # the sweep ran; some job did not finish (already said, exit 1)
        except SystemExit as exc:
            # Hydra reports a config it cannot compose (unknown choice, bad override syntax) with the
            # valid options and exit code 1; in robustcnn's codes that is bad input: 2
            raise SystemExit(2 if exc.code == 1 else exc.code) from None
        finally:
            # a sweep whose job failed never reaches Hydra's end callback: end its parent run here
            reason = reason or (f"a job failed: {_job_errors[-1]}" if _job_errors else None)
            close_open_sweeps("FAILED" if status == "FINISHED" else status, reason)
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


def _default_attacks() -> str:
    """The attack list conf/config.yaml selects (``fgsm,apgd,apgd_t``)."""
    import yaml

    from robustcnn.config import conf_dir

    for entry in yaml.safe_load((conf_dir() / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, Mapping) and "attack" in entry:
            return ",".join(str(name) for name in entry["attack"])
    return ""


def unknown_key_message(hydra_message: str, overrides: Sequence[str]) -> str | None:
    """One error line with the fix for an override of a key the config does not have (None: another error).

    Why: Hydra answers ``attack.pgd.steps=100`` without ``pgd`` among the selected attacks with six
    lines about structs and ``+`` appends; the user's real mistake is that the attack is not selected.
    """
    import re

    from robustcnn.config import config_groups

    found = re.search(r"Could not override '([^']+)'", hydra_message)
    if found is None or "To append to your config use +" not in hydra_message:
        return None
    key = found.group(1)
    parts = key.split(".")
    attacks = config_groups().get("attack", [])
    if len(parts) >= 3 and parts[0] == "attack" and parts[1] in attacks:
        chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith("attack=")), None)
        preset = next((o for o in overrides if o.startswith("experiment=")), None)
        if chosen is None and preset is not None:
            return (
                f"{key} sets attack {parts[1]}, which {preset} does not select; "
                f"add it: attack=[...,{parts[1]}]"
            )
        listed = (chosen or _default_attacks()).strip("[]")
        return (
            f"{key} sets attack {parts[1]}, which is not selected (attack=[{listed}]); "
            f"select it too: attack=[{listed + ',' if listed else ''}{parts[1]}] {key}=..."
        )
    return (
        f"{key} is not a setting of the config; check its spelling "
        "(`robustcnn run --cfg job` prints every setting), or add a new key with +" + key + "=..."
    )


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
    from robustcnn.jobs.dispatch import check_config
    from robustcnn.jobs.inputs import to_container

    try:
        cfg = compose(overrides)
    except HydraException as exc:
        message = unknown_key_message(str(exc), overrides)
        if message is not None:
            fail(message)
        return  # an unknown choice or a bad override: Hydra says so, listing the options
    except Exception as exc:  # what Hydra does not catch itself (e.g. a list given to a group)
        detail = " ".join(str(exc).split())[:200]
        fail(
            f"the overrides {' '.join(overrides)} cannot be composed ({type(exc).__name__}: {detail}); "
            "check each group=choice and key=value (`robustcnn run --help` lists the groups)"
        )
    check_config(to_container(cfg), device=not multirun)
