"""Several clients on one new sqlite store at the same moment (issue 20): every process finishes.

Before, three ``robustcnn run`` started together on a fresh store all exited 2 (``table
_alembic_tmp_metrics already exists``, ``duplicate column name: step``), and a sweep started beside
another MLflow client died before its first job: both ran mlflow's schema migrations on one file.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustcnn.tracking.store import TrackingStore

#: A job of a few seconds: lenet5 on 256 images, one attack on 32 test images at two radii.
TINY = (
    "experiment=smoke",
    "data.max_train=256",
    "data.max_test=64",
    "training.epochs=1",
    "threat.eps=[0,0.3]",
    "eval.attack_samples=32",
    "checks.probe_samples=32",
)

#: A plain MLflow client (a script, a notebook) that opens the store and creates an experiment. With
#: a path as its second argument it first waits for that file to appear, to open the store the moment
#: another process has started making it (mlflow itself imported beforehand, so no time is lost).
OTHER_CLIENT = """
import os, sys, time
import mlflow

if len(sys.argv) > 2:
    deadline = time.monotonic() + 300
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.005)
mlflow.set_tracking_uri(sys.argv[1])
mlflow.search_runs(search_all_experiments=True)
mlflow.create_experiment("someone-else")
print("other client done")
"""


def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store path with no file yet (its schema is made by whichever client comes first)."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ROBUSTCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    return uri


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_three_runs_started_together_on_a_new_store_all_finish_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = fresh_store(tmp_path, monkeypatch)
    procs = [
        start("-m", "robustcnn.cli", "run", *TINY, "attack=[fgsm]", f"seed={seed}", cwd=tmp_path)
        for seed in range(3)
    ]
    for rc, _, err in map(finish, procs):
        assert rc == 0, err[-2000:]
    store = TrackingStore.at(uri)
    runs = store.search_runs(store.ensure_experiment("smoke"))
    assert len(runs) == 3 and {r["status"] for r in runs} == {"FINISHED"}
    assert sorted(r["tags"]["mlflow.runName"] for r in runs)  # named, complete runs
    assert all("clean_accuracy" in r["metrics"] for r in runs)


@pytest.mark.slow
def test_a_sweep_started_beside_another_mlflow_client_on_a_new_store_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other client opens the store the moment the sweep's file appears (before, that was while
    the sweep's migrations ran on it, and the sweep died: ``index ... already exists``)."""
    uri = fresh_store(tmp_path, monkeypatch)
    other = start("-c", OTHER_CLIENT, uri, str(tmp_path / "fresh" / "mlflow.db"), cwd=tmp_path)
    sweep = start("-m", "robustcnn.cli", "run", "-m", *TINY, "attack=fgsm,noise", cwd=tmp_path)
    rc, _, err = finish(sweep)
    assert rc == 0, err[-2000:]
    other_rc, other_out, other_err = finish(other)
    assert other_rc == 0 and "other client done" in other_out, other_err[-2000:]
    store = TrackingStore.at(uri)
    runs = store.search_runs(store.ensure_experiment("smoke"))
    jobs = [r for r in runs if r["tags"].get("robustcnn.sweep") != "true"]
    assert len(jobs) == 2 and {r["status"] for r in runs} == {"FINISHED"}
    assert store.client.get_experiment_by_name("someone-else") is not None


@pytest.mark.slow
def test_a_store_another_mlflow_client_is_creating_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: another client made the file and is migrating it when robustcnn opens it."""
    import mlflow.tracking  # imported before the race starts, as a running process has it

    assert mlflow.tracking.MlflowClient
    uri = fresh_store(tmp_path, monkeypatch)
    path = tmp_path / "fresh" / "mlflow.db"
    other = start("-c", OTHER_CLIENT, uri, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not path.exists() and other.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    store = TrackingStore.at(uri)
    with store.start_run("mine") as run:
        run.log_metrics({"m": 1.0})
    other_rc, other_out, other_err = finish(other)
    assert other_rc == 0 and "other client done" in other_out, other_err[-2000:]
    assert store.read_run(run.run_id)["metrics"]["m"] == 1.0
