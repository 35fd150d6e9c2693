"""Hydra launchers (conf/hydra/launcher/): real sweeps through joblib, submitit_local and Ray.

Each sweep runs in a subprocess against the test's private store and must leave exactly one
parent run and one FINISHED child per job under it, nothing in the Default experiment, and
the marker file the jobs find their sweep by. The plugins come with the `launchers` extra
(`make install`); without it these tests skip.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from test_sweep import TINY  # tiny jobs of a few seconds each

from robustcnn.config import quiet_schema_matching
from robustcnn.sweeps.launchers import launcher_failure, prepare_launcher
from robustcnn.tracking.store import TrackingStore
from robustcnn.tracking.sweep_link import MARKER_FILE

#: A local Ray instance kept small: 2 CPUs, the smallest object store Ray accepts (75 MiB).
RAY_LOCAL = (
    "hydra.launcher.ray.init.address=local",
    "hydra.launcher.ray.init.num_cpus=2",
    "hydra.launcher.ray.init.object_store_memory=78643200",
)


def sweep(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "robustcnn.cli", "run", "-m", *TINY, *args]
    return subprocess.run(command, cwd=root, text=True, capture_output=True, timeout=timeout)


def sweep_dir(root: Path) -> Path:
    (folder,) = root.glob("multirun/*/*")
    return folder


def assert_one_parent_with_children(store: str, root: Path, jobs: int) -> list[dict]:
    """The sweep's runs: one FINISHED parent, ``jobs`` FINISHED children under it; returns those."""
    runs = TrackingStore.at(store).search_runs(TrackingStore.at(store).ensure_experiment("smoke"))
    parents = [r for r in runs if r["tags"].get("robustcnn.sweep") == "true"]
    children = [r for r in runs if r not in parents]
    assert [p["status"] for p in parents] == ["FINISHED"], parents
    assert len(children) == jobs and {c["status"] for c in children} == {"FINISHED"}, children
    assert {c["tags"].get("mlflow.parentRunId") for c in children} == {parents[0]["run_id"]}
    assert sorted(int(c["tags"]["robustcnn.job_num"]) for c in children) == list(range(jobs))
    assert TrackingStore.at(store).search_runs("0") == [], "a job logged into the Default experiment"
    folder = sweep_dir(root)
    assert (folder / MARKER_FILE).is_file()
    results = [json.loads((folder / str(n) / "results.json").read_text()) for n in range(jobs)]
    assert {r["mlflow_run_id"] for r in results} == {c["run_id"] for c in children}
    return results


# -- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm", "ray"])
def test_presets_are_ours_on_the_plugins_schema(launcher: str) -> None:
    """`hydra/launcher=X` loads conf/hydra/launcher/X.yaml merged onto the plugin's schema, quietly."""
    if launcher != "basic":
        pytest.importorskip(f"hydra_plugins.hydra_{launcher.split('_')[0]}_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from robustcnn.config import conf_dir

    GlobalHydra.instance().clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_schema_matching()  # what importing robustcnn.cli does, ahead of "always"
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert not [w for w in caught if "ConfigStore schema" in str(w.message)]
    settings = cfg.hydra.launcher
    plugin_class = {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_local": "LocalLauncher",
                    "submitit_slurm": "SlurmLauncher", "ray": "RayLauncher"}[launcher]
    assert settings._target_.endswith(f".{plugin_class}")
    ours_and_schema = {  # a value our preset sets, and one only the plugin's schema brings
        "joblib": {"n_jobs": 2, "pre_dispatch": "2*n_jobs"},
        "submitit_local": {"gpus_per_node": 0, "tasks_per_node": 1},
        "submitit_slurm": {"gpus_per_node": 1, "signal_delay_s": 120},
        "ray": {"ray.remote.num_gpus": 0, "ray.remote.max_retries": 0, "ray.init.address": None},
    }.get(launcher, {})
    for key, value in ours_and_schema.items():
        assert OmegaConf.select(settings, key) == value, key
    if launcher == "submitit_slurm":
        assert "qos" in settings  # a schema key the preset does not mention
        assert list(settings.setup) == [f"export OMP_NUM_THREADS={settings.cpus_per_task}"]


def test_ray_tasks_get_the_sweep_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks on other machines do not inherit the driver's environment: runtime_env carries it."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("ROBUSTCNN_SWEEP_RUN_ID", "parent")
    monkeypatch.setenv("ROBUSTCNN_SWEEP_EXPERIMENT_ID", "7")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # prepare_launcher sets it for Ray; keep it local
    cfg = OmegaConf.create(
        {
            "device": "cpu",
            "hydra": {
                "launcher": {
                    "_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
                    "ray": {"init": {"runtime_env": {"env_vars": {"MINE": "1"}}}, "remote": {}},
                }
            },
        }
    )
    OmegaConf.set_readonly(cfg.hydra, True)
    prepare_launcher(cfg)
    assert cfg.hydra.launcher.ray.init.runtime_env.env_vars == {
        "MINE": "1",
        "MLFLOW_TRACKING_URI": "http://tracking:5000",
        "ROBUSTCNN_SWEEP_RUN_ID": "parent",
        "ROBUSTCNN_SWEEP_EXPERIMENT_ID": "7",
    }


def test_a_submitit_failure_becomes_one_line_naming_the_log() -> None:
    utils = pytest.importorskip("submitit.core.utils")
    error = utils.UncompletedJobError(
        "Job 41 (task: 0) with path /s/.submitit/41/41_0_result.pkl\n"
        "has not produced any output (state: FINISHED)\nError stream produced:\n" + "-" * 40 + "\n"
        "robustcnn: error: max_test must be a positive integer or null, got 0\n"
    )
    line = launcher_failure(error)
    assert line is not None
    assert "max_test must be a positive integer" in line and "/s/.submitit/41/41_0_log.err" in line
    crashed = utils.FailedJobError(
        "Job (task=0) failed during processing with trace:\n" + "-" * 22 + "\n"
        'Traceback (most recent call last):\n  File "x.py", line 1\nMemoryError: out of memory\n'
        + "-" * 22 + "\n"
        "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
        "  - /s/.submitit/42/42_0_log.err\n  - /s/.submitit/42/42_0_log.out"
    )
    assert launcher_failure(crashed) == (
        "a sweep job failed under submitit: MemoryError: out of memory; its log: /s/.submitit/42/42_0_log.err"
    )
    assert launcher_failure(ValueError("a bug")) is None
    from hydra.errors import MissingConfigException

    missing = MissingConfigException("In 'config': Could not find 'defense/nope'", "defense/nope")
    assert launcher_failure(missing) == "In 'config': Could not find 'defense/nope'"


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "extra", "threads"),
    [
        # joblib: loky workers get OMP_NUM_THREADS = cpus // n_jobs, and torch keeps it
        ("joblib", ("hydra.launcher.n_jobs=2",), "joblib"),
        # submitit_local does not limit threads: the sweep sets threads=1 itself
        ("submitit_local", ("threads=1",), 1),
        # Ray sets OMP_NUM_THREADS to the task's num_cpus (1 in the preset)
        ("ray", RAY_LOCAL, 1),
    ],
)
def test_two_job_sweep_logs_one_parent_and_its_children(
    isolated: dict, launcher: str, extra: tuple[str, ...], threads: int | str
) -> None:
    plugin = {"joblib": "hydra_joblib_launcher", "submitit_local": "hydra_submitit_launcher"}
    pytest.importorskip(f"hydra_plugins.{plugin.get(launcher, 'hydra_ray_launcher')}")
    root, store = isolated["root"], isolated["store"]
    started = time.monotonic()
    out = sweep(root, "seed=0,1", f"hydra/launcher={launcher}", *extra)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr and "ConfigStore schema" not in out.stderr
    results = assert_one_parent_with_children(store, root, jobs=2)
    if threads == "joblib":
        import joblib

        threads = int(os.environ.get("OMP_NUM_THREADS") or max(joblib.cpu_count() // 2, 1))
    assert [r["environment"]["threads"] for r in results] == [threads, threads]
    if launcher == "submitit_local":  # the jobs' output went to submitit's logs
        logs = sorted(sweep_dir(root).glob(".submitit/*/*_log.out"))
        assert len(logs) == 2 and all("clean_accuracy=" in log.read_text() for log in logs)
    print(f"{launcher}: 2-job sweep in {time.monotonic() - started:.1f}s")


def metric_rows(store: str) -> dict[str, tuple[int, int]]:
    """Per run: metric values logged (every step) and distinct keys, counted in the sqlite store."""
    query = "SELECT run_uuid, COUNT(*), COUNT(DISTINCT key) FROM metrics GROUP BY run_uuid"
    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
        return {run: (values, keys) for run, values, keys in db.execute(query).fetchall()}


@pytest.mark.slow
def test_four_joblib_workers_share_one_sqlite_store_without_losses(isolated: dict) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    root, store = isolated["root"], isolated["store"]
    out = sweep(
        root, "seed=0,1,2,3", "attack=fgsm", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    results = assert_one_parent_with_children(store, root, jobs=4)
    rows = metric_rows(store)
    counts = [rows.get(r["mlflow_run_id"], (0, 0)) for r in results]
    # the four jobs differ only in their seed, so each logged exactly as many values and keys
    assert counts[0][1] > 20 and counts == [counts[0]] * 4, counts
    assert len({r["clean_accuracy"] for r in results}) > 1, "the seeds should differ"


@pytest.mark.slow
def test_a_failed_submitit_job_names_its_log(isolated: dict) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root, store = isolated["root"], isolated["store"]
    out = sweep(root, "data.max_test=0,-1", "hydra/launcher=submitit_local", "threads=1")
    assert out.returncode == 2, out.stderr[-4000:]
    assert "Traceback" not in out.stderr
    line = next(x for x in out.stderr.splitlines() if x.startswith("robustcnn: error:"))
    assert "max_test" in line and "its log: " in line
    log = Path(line.split("its log: ")[1].strip())
    assert log.is_file() and "max_test" in log.read_text()
    runs = TrackingStore.at(store).search_runs(TrackingStore.at(store).ensure_experiment("smoke"))
    assert [r["status"] for r in runs if r["tags"].get("robustcnn.sweep") == "true"] == ["FAILED"]


@pytest.mark.slow
def test_a_bad_choice_under_a_parallel_launcher_is_still_one_error(isolated: dict) -> None:
    """HYDRA_FULL_ERROR (set for submitit and Ray after the config composed) must not expose traces."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = sweep(isolated["root"], "defense=none,nope", "hydra/launcher=submitit_local")
    assert out.returncode == 2, out.stderr[-4000:]
    assert "Traceback" not in out.stderr and "robustcnn: error: In 'config': Could not find" in out.stderr
    assert "pgd_at" in out.stderr  # the valid options are listed
    assert not list(sweep_dir(isolated["root"]).glob(".submitit/*/*_log.out")), "no job may start"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc: the workers a launcher started)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists worker processes from /proc")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupted_joblib_sweep_exits_cleanly_without_orphaned_workers(
    isolated: dict, how: signal.Signals
) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    root, store = isolated["root"], isolated["store"]
    command = [
        sys.executable, "-m", "robustcnn.cli", "run", "-m", *TINY, "attack=pgd", "eval.attack_samples=200",
        "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            started = (root / "multirun").exists()  # the sweep has created its experiment by then
            tracked = TrackingStore.at(store)
            runs = tracked.search_runs(tracked.ensure_experiment("smoke")) if started else []
            if any(r["status"] == "RUNNING" and r["tags"].get("robustcnn.job_num") for r in runs):
                break
            time.sleep(0.2)
        workers = _descendants(proc.pid)
        assert workers, "the sweep should have started its workers"
        proc.send_signal(how)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"worker processes outlived the sweep: {orphans}"
    runs = TrackingStore.at(store).search_runs(TrackingStore.at(store).ensure_experiment("smoke"))
    assert [r["status"] for r in runs if r["tags"].get("robustcnn.sweep")] == ["KILLED"]
