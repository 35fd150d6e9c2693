"""The lifecycle every job kind shares: settle device, store and output folder, look for an identical
finished job, open the MLflow run, record results on disk and in the store, say what was lost.

Why one lifecycle: the classifier, face and audit jobs must fail, resume and reuse results the same way
(a job that dies is FAILED in the store, a store that dies mid-job leaves results on disk for
``robustcnn sync``), so none of them writes its own version of these steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustcnn import __version__
from robustcnn.device import resolve_device, seed_everything, set_threads
from robustcnn.errors import TrackingError
from robustcnn.files import OutputError, check_output_folder, write_json
from robustcnn.hashing import code_version, job_key
from robustcnn.tracking.resume import JOB_KEY_TAG, find_finished
from robustcnn.tracking.store import RunLogger, TrackingStore
from robustcnn.tracking.sweep_link import SweepLink
from robustcnn.training.cache import WeightCache

log = logging.getLogger(__name__)


def environment_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "robustcnn": __version__,
        "device": str(device),
        "threads": torch.get_num_threads(),  # what the launcher / `threads` left torch (see README)
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(out: Path | None, results: dict[str, Any]) -> None:
    """results.json next to the job's output: kept even when the tracking store is gone."""
    write_json(out, "results.json", results)


def store_lost_error(uri: str, run: RunLogger, out: Path | None) -> TrackingError:
    """The one line a job prints when the store failed while it ran (its results are on disk)."""
    where = f"{out}/results.json" if out is not None else "no output folder (output_dir was None)"
    fix = f"`robustcnn sync {out}`" if out is not None else "re-running the job"
    return TrackingError(
        f"the MLflow store {uri} failed during the job ({run.lost}); the job finished and its results "
        f"are in {where}; once the store is back, {fix} imports them (or re-run the same command)"
    )


@dataclass(frozen=True)
class JobContext:
    """What every job kind settles before it opens a run: device, store, output folder, job key.

    ``key`` and ``previous`` are set by :func:`identify_job` once the job's inputs are loaded.
    """

    started: float
    config: dict[str, Any]
    seed: int
    device: torch.device
    store: TrackingStore
    experiment: str
    experiment_id: str
    out: Path | None
    sweep: SweepLink | None
    key: str | None = None
    previous: dict[str, Any] | None = None  # a finished identical job's results (reused unless force=true)


def prepare_job(
    config: dict[str, Any], output_dir: str | Path | None, sweep: SweepLink | None, *, uses_cache: bool
) -> JobContext:
    """Threads, seed, device, tracking store, cache and output folder checks (no inputs read yet).

    Shared by every kind of job (classifier battery, face patch study) so they fail, resume and
    reuse results the same way; each then loads its inputs and calls :func:`identify_job`.
    """
    started = time.perf_counter()
    set_threads(config.get("threads"))
    seed = int(config.get("seed", 0))
    seed_everything(seed)
    device = resolve_device(config.get("device", "auto"))
    tracking = config.get("tracking") or {}
    experiment = tracking.get("experiment") or "robustcnn"
    store = TrackingStore.at(sweep.tracking_uri) if sweep else TrackingStore.resolve(tracking.get("uri"))
    store.check_writable()
    if uses_cache:
        WeightCache(config["paths"]["cache_dir"]).ensure_writable()
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        check_output_folder(out, "the job's output folder", "hydra.run.dir (hydra.sweep.dir in a sweep)")
        out.mkdir(parents=True, exist_ok=True)
    experiment_id = sweep.experiment_id if sweep else store.ensure_experiment(experiment)
    if sweep is None:  # a sweep's own process reaped its experiment once, before any job
        store.reap_orphaned_runs(experiment_id)
    return JobContext(started, config, seed, device, store, experiment, experiment_id, out, sweep)


def identify_job(ctx: JobContext, inputs: Mapping[str, Any]) -> JobContext:
    """The job's key from its config and its ``inputs``' identity; a finished identical job's results.

    Why after the inputs are loaded: a result depends on what the data files, photos and weights
    hold, not only on the config that names them (:func:`robustcnn.hashing.job_key`); loading them
    costs a fraction of a second (files are hashed, nothing is trained), and a job that is not
    reused needs them next anyway. ``ctx.previous`` holds the reused results (also written to the
    output folder), or None when the job must run.
    """
    key = job_key(ctx.config, inputs=inputs)
    previous = None
    if not ctx.config.get("force", False):
        previous = find_finished(ctx.store, ctx.experiment_id, key)
        if previous is not None:
            log.info(
                "identical job already finished in run %s: reused (force=true runs it again)",
                previous["reused_from"],
            )
            write_results(ctx.out, previous)
    return dataclasses.replace(ctx, key=key, previous=previous)


def job_run_tags(ctx: JobContext, tags: dict[str, Any], job_tags: dict[str, Any] | None) -> dict[str, Any]:
    """The tags every run starts with: version, job key, code version, the sweep cell's tags."""
    if ctx.key is None:
        raise RuntimeError("a job's run is tagged after identify_job (its key covers its inputs)")
    return {
        "robustcnn.version": __version__,
        **tags,
        JOB_KEY_TAG: ctx.key,
        "robustcnn.code_version": code_version(),
        **(job_tags or {}),
    }


@dataclass(frozen=True)
class RunRecord:
    """The run a job or an audit opened, as ``run.json`` keeps it: what ``robustcnn sync`` rebuilds."""

    experiment: str
    run_name: str
    parent_run_id: str | None
    tags: dict[str, Any]
    params: dict[str, Any]


def write_run_files(out: Path | None, run: RunLogger, config: dict[str, Any], record: RunRecord) -> None:
    """config.json and run.json on disk before anything is logged, so a store that dies loses nothing.

    Why shared: the classifier and face jobs and the audit all leave the same files, and
    ``robustcnn sync`` imports any folder that has them.
    """
    write_json(out, "config.json", config)
    write_json(
        out,
        "run.json",
        {
            "tracking_uri": run.uri,
            "experiment": record.experiment,
            "experiment_id": run.experiment_id,
            "run_id": run.run_id,
            "run_name": record.run_name,
            "parent_run_id": record.parent_run_id,
            "tags": record.tags,
            "params": {k: str(v) for k, v in record.params.items()},
        },
    )


def record_run_start(
    run: RunLogger, ctx: JobContext, run_name: str, tags: dict[str, Any], params: dict[str, Any]
) -> None:
    """config.json and run.json on disk (what ``robustcnn sync`` needs), params and config in the run."""
    parent = ctx.sweep.parent_run_id if ctx.sweep else None
    write_run_files(ctx.out, run, ctx.config, RunRecord(ctx.experiment, run_name, parent, tags, params))
    run.log_params(params)
    run.flush()  # the params are in the store before any work: a job that dies shows what it was
    run.log_dict(ctx.config, "config.json")


@contextlib.contextmanager
def open_job_run(
    ctx: JobContext, run_name: str, tags: dict[str, Any], params: dict[str, Any]
) -> Iterator[RunLogger]:
    """The job's MLflow run (under the sweep's parent, if any), its params and files recorded first."""
    with ctx.store.start_run(
        ctx.experiment,
        run_name,
        tags,
        experiment_id=ctx.experiment_id,
        parent_run_id=ctx.sweep.parent_run_id if ctx.sweep else None,
    ) as run:
        record_run_start(run, ctx, run_name, tags, params)
        yield run


def record_results(run: RunLogger, ctx: JobContext, results: dict[str, Any]) -> OutputError | None:
    """results.json on disk and in the run; a disk failure is returned (raised after the run ends)."""
    results["job_seconds"] = time.perf_counter() - ctx.started  # wall time, bookkeeping included
    # when it started, on the clock other processes read: the gaps between a sweep's jobs are the
    # runner's own cost around them (benchmarks/sweep_overhead.py)
    results["job_started_unix"] = time.time() - results["job_seconds"]
    unwritten: OutputError | None = None
    try:
        write_results(ctx.out, results)
    except OutputError as exc:  # e.g. the disk filled up: the store still gets the results
        unwritten = exc
    run.log_dict(results, "results.json")
    return unwritten


def raise_unrecorded(run: RunLogger, ctx: JobContext, unwritten: OutputError | None) -> None:
    """After the run closed: say where results are when the disk or the store failed."""
    if unwritten is not None:
        where = f"MLflow run {run.run_id} (results.json)" if run.lost is None else "no store either"
        raise OutputError(f"{unwritten}; the job's results are in {where}")
    if run.lost is not None:
        raise store_lost_error(ctx.store.uri, run, ctx.out)

