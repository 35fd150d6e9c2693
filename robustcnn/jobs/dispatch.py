"""Which job a config asks for (``task=classify`` or ``task=face_patch``), checked and then run.

Why a dispatcher above the job kinds: the CLI, sweeps and tests call one ``check_config`` and one
``run_job``; each job kind stays a peer that knows nothing of the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from robustcnn.errors import ConfigError
from robustcnn.jobs.classify import JobPlan, check_classify_config, run_classify_job
from robustcnn.jobs.face import FacePlan, check_face_config, run_face_job
from robustcnn.jobs.inputs import to_container
from robustcnn.tracking.sweep_link import SweepLink


def is_face_task(config: dict[str, Any]) -> bool:
    """A face patch study (``task=face_patch``) rather than a classifier battery (``task=classify``)."""
    task = config.get("task", "classify")
    if task not in ("classify", "face_patch"):
        raise ConfigError(f"task={task!r} is unknown; use task=classify or task=face_patch")
    return task == "face_patch"


def check_config(config: dict[str, Any], *, device: bool = True) -> JobPlan | FacePlan:
    """Every check of a job's settings that needs no data, store or cache: bad values fail here.

    ``run_job`` calls it first and runs on what it returns; ``robustcnn run`` calls it on the
    composed config before Hydra starts (for a sweep, on its first cell), so a bad value never
    opens an MLflow run. A sweep's jobs may run on other machines (SLURM, Ray), so there
    ``device=False`` leaves the device to them.
    """
    if is_face_task(config):
        return check_face_config(config, device=device)
    return check_classify_config(config, device=device)


def run_job(
    cfg: DictConfig | dict[str, Any],
    output_dir: str | Path | None = None,
    progress: bool = True,
    sweep: SweepLink | None = None,
    job_tags: dict[str, Any] | None = None,
    defense_label: str | None = None,
) -> dict[str, Any]:
    """Run one job end to end and return its results (also written to ``output_dir/results.json``).

    A job whose identical config (and code) already finished in the same experiment is not run
    again unless ``force=true``: its results are linked (``reused_from``) and returned.
    ``sweep`` puts the run under a sweep's parent run; ``job_tags`` (Hydra's job number and
    overrides) make the sweep's cells tell apart in the MLflow UI; ``defense_label`` (the Hydra
    preset and its overrides, :func:`robustcnn.sweeps.callback.defense_label`) names the defense in
    run names, summaries and the report, where ``defense.name`` is only its type.
    """
    config = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    if is_face_task(config):
        return run_face_job(config, output_dir, progress=progress, sweep=sweep, job_tags=job_tags)
    plan = check_classify_config(config)
    return run_classify_job(config, plan, output_dir, progress, sweep, job_tags, defense_label)
