"""What robustcnn adds around Hydra's launcher plugins (presets in conf/hydra/launcher/).

- The presets share their names with the plugins' structured configs on purpose (so
  ``hydra/launcher=joblib`` picks our preset, merged onto the plugin's schema); Hydra 1.3 warns
  about that merge each time it composes: :func:`robustcnn.config.quiet_schema_matching` silences it.
- Ray tasks on other machines do not inherit this process's environment: :func:`prepare_launcher`
  hands them the sweep's store and parent run through Ray's ``runtime_env``.
- A submitit or Ray job that exits on an error (robustcnn's jobs do, with one ``robustcnn: error``
  line) reaches the sweep's process as the launcher's exception, which Hydra would print as a stack
  trace; :func:`prepare_launcher` lets it through to the CLI (HYDRA_FULL_ERROR, set only after the
  config composed) and :func:`launcher_failure` makes it one line that names the job's log (submitit
  writes a job's output only to its log files).
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # omegaconf is imported lazily: the CLI imports this module at start-up
    from omegaconf import DictConfig

def prepare_launcher(config: DictConfig) -> None:
    """Called by the sweep callback before the launcher exists (it reads ``config`` afterwards)."""
    from omegaconf import OmegaConf

    launcher = OmegaConf.select(config, "hydra.launcher")
    if launcher is None:
        return
    target = str(launcher.get("_target_", ""))
    if target.endswith("RayLauncher"):
        _ray_runtime_env(launcher)
    if target.endswith(("RayLauncher", "LocalLauncher", "SlurmLauncher")):
        # from here on (the config composed), Hydra re-raises instead of printing a stack trace
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    problem = _gpu_problem(launcher, target)
    if problem and str(OmegaConf.select(config, "device", default="auto")).startswith(("auto", "cuda")):
        import torch

        if torch.cuda.is_available():
            print(f"robustcnn: warning: {problem}", file=sys.stderr)


def _ray_runtime_env(launcher: DictConfig) -> None:
    """Add the sweep's environment to ray.init(runtime_env={"env_vars": ...}) (user values win)."""
    from omegaconf import OmegaConf, open_dict, read_write

    from robustcnn.tracking.sweep_link import ENV_EXPERIMENT_ID, ENV_PARENT_RUN  # what SweepLink.find reads

    keys = ("MLFLOW_TRACKING_URI", ENV_PARENT_RUN, ENV_EXPERIMENT_ID)
    env = {key: os.environ[key] for key in keys if os.environ.get(key)}
    init = launcher.ray.init
    with read_write(init), open_dict(init):
        given = init.get("runtime_env")
        runtime_env = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else {}
        assert isinstance(runtime_env, dict)
        runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
        init.runtime_env = runtime_env


def _gpu_problem(launcher: DictConfig, target: str) -> str | None:
    """What goes wrong with GPUs under this launcher's settings (None: nothing)."""
    from omegaconf import OmegaConf

    if target.endswith("LocalLauncher") and not launcher.get("gpus_per_node"):
        return (
            "hydra.launcher.gpus_per_node is 0: submitit hides the GPUs from the jobs, which run on the "
            "CPU (set hydra.launcher.gpus_per_node=1)"
        )
    if target.endswith("RayLauncher") and not OmegaConf.select(launcher, "ray.remote.num_gpus"):
        return (
            "hydra.launcher.ray.remote.num_gpus is 0: Ray reserves no GPU for the jobs, which all use "
            "cuda:0 at once (set hydra.launcher.ray.remote.num_gpus=1)"
        )
    return None


def launcher_failure(error: BaseException) -> str | None:
    """The error message for what a sweep raised once HYDRA_FULL_ERROR was set (None: raise it as is).

    A submitit or Ray job that failed becomes one line naming its reason and log; a config Hydra
    cannot compose (an override naming a missing option, found when the sweeper checks the jobs)
    reads as Hydra would have printed it.
    """
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, CompactHydraException):
        cause = error.__cause__
        return str(error) + (f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else "")
    kind = f"{type(error).__module__}.{type(error).__name__}"
    if kind.startswith("submitit."):
        text, _, paths = str(error).partition("You can check full logs")  # FailedJobError: trace, logs
        log = re.search(r"- (\S+_log\.err)", paths)
        result = re.search(r"with path (\S+)_result\.pkl", text)  # UncompletedJobError names its pickle
        path = log.group(1) if log else f"{result.group(1)}_log.err" if result else "<sweep dir>/.submitit/"
        return f"a sweep job failed under submitit: {_reason(text)}; its log: {path}"
    if kind.startswith("ray."):
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        return (
            f"a sweep job failed under Ray ({type(error).__name__}: {first}); the job's own lines are "
            "the ones prefixed '(_run_job pid=...)'"
        )
    return None


def _reason(text: str) -> str:
    """The job's own ``robustcnn: error`` line if its error stream has one, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("---")]
    ours = [line for line in lines if line.startswith("robustcnn: error:")]
    if ours:
        return ours[-1].removeprefix("robustcnn: error:").strip()
    return lines[-1] if lines else "no output"
