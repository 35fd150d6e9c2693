"""A tracking store that fails while a job runs: the job finishes, keeps its results on disk, and
``robustcnn sync`` imports them exactly once, reading like a run logged live."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustcnn.cli import main
from robustcnn.config import compose
from robustcnn.errors import ConfigError, TrackingError
from robustcnn.jobs.dispatch import run_job
from robustcnn.tracking.store import TrackingStore
from robustcnn.tracking.sync import ORIGINAL_TAG, sync

#: A whole job (train, clean accuracy, FGSM battery, checks) in a few seconds; shared by the fault tests.
TINY_JOB = [
    "experiment=smoke",
    "data.max_train=128",
    "data.max_test=64",
    "training.epochs=2",
    "training.max_batches=2",
    "training.batch_size=32",
    "attack=[fgsm]",
    "eval.attack_samples=32",
    "checks.probe_samples=32",
]
#: Metrics that measure speed: equal in kind, not in value, between two runs of one job.
TIMING = ("timing/", "eval_images_per_s")


def _fail_logging_after_the_run_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch write to the store fails, as when the server went away after create_run."""
    from mlflow.tracking import MlflowClient

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionError("simulated: connection refused by 127.0.0.1:5000")

    monkeypatch.setattr(MlflowClient, "log_batch", refused)


def test_store_failing_mid_job_keeps_results_and_sync_imports_them_once(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, store = isolated["root"], isolated["store"]
    cfg = compose(TINY_JOB)
    with monkeypatch.context() as failing:
        _fail_logging_after_the_run_opens(failing)
        with pytest.raises(TrackingError) as caught:
            run_job(cfg, output_dir=root / "lost", progress=False)
    message = str(caught.value)
    assert "robustcnn sync" in message and str(root / "lost") in message and "\n" not in message
    results = json.loads((root / "lost/results.json").read_text())
    assert results["verdict"] and results["robust_accuracy"]["fgsm"]  # the job ran to the end
    original = json.loads((root / "lost/run.json").read_text())["run_id"]
    # what a dead store leaves behind
    assert TrackingStore.at(store).read_run(original)["status"] == "RUNNING"

    first = sync([root])
    assert [o.status for o in first] == ["imported"]
    imported = TrackingStore.at(store).read_run(first[0].run_id)
    assert imported["status"] == "FINISHED" and imported["tags"][ORIGINAL_TAG] == original
    replaced = TrackingStore.at(store).read_run(original)
    assert replaced["status"] == "FAILED" and replaced["tags"]["robustcnn.superseded_by"] == first[0].run_id

    # the imported run reads like the same job logged live (weights now cached: seconds)
    live = run_job(compose([*TINY_JOB, "force=true"]), output_dir=root / "live", progress=False)
    logged = TrackingStore.at(store).read_run(live["mlflow_run_id"])
    assert set(imported["metrics"]) == set(logged["metrics"])
    for name, value in logged["metrics"].items():
        if not name.startswith(TIMING) and name != "train_seconds":
            assert imported["metrics"][name] == pytest.approx(value), name
    assert set(imported["params"]) == set(logged["params"])
    assert imported["tags"]["verdict"] == logged["tags"]["verdict"]

    # repeating the sync (or syncing the whole tree, the live job included) adds nothing
    second = sync([root])
    assert sorted(o.status for o in second) == ["present", "present"]
    experiment_id = TrackingStore.at(store).ensure_experiment("smoke")
    finished = TrackingStore.at(store).search_runs(experiment_id, "attributes.status = 'FINISHED'")
    assert len(finished) == 2  # the imported job and the live one, each once


def test_sync_cli_reports_each_folder_and_damaged_files(
    isolated: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = isolated["root"]
    with monkeypatch.context() as failing:
        _fail_logging_after_the_run_opens(failing)
        with pytest.raises(TrackingError):
            run_job(compose(TINY_JOB), output_dir=root / "sweep/0", progress=False)
    damaged = root / "sweep/1"
    damaged.mkdir(parents=True)
    (damaged / "results.json").write_text("{ truncated")
    (damaged / "run.json").write_text("{}")
    with pytest.raises(SystemExit) as exited:
        main(["sync", str(root / "sweep")])
    out = capsys.readouterr().out
    assert exited.value.code == 1  # one folder could not be read: not a silent success
    assert "imported" in out and "damaged" in out and "sync: 1 imported, 0 already present, 1 damaged" in out
    assert json.loads((damaged / "run.json").read_text()) == {}  # sync never rewrites a job's files


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "nope", "does not exist"),
        (lambda root: root, "no job or audit output folder"),
    ],
    ids=["missing folder", "no job folder"],
)
def test_sync_bad_paths_are_one_clear_error(isolated: dict, make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sync([make(isolated["root"])])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """A real ``mlflow server`` (sqlite + proxied artifacts), in its own process group."""
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],  # fmt: skip
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "ab"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None:
            break
        time.sleep(0.25)
    _stop(server)
    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


def _logging_jobs(db: Path) -> int:
    """RUNNING runs that have logged params: the job has its run (a kill while the server is still
    answering create_run would fail the run's creation instead, a different, tested path)."""
    query = (
        "select count(distinct runs.run_uuid) from runs join params on params.run_uuid = runs.run_uuid "
        "where runs.status = 'RUNNING'"
    )
    try:
        with sqlite3.connect(db) as con:
            return int(con.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def _cli(*args: str, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", *args], cwd=root, env=env, text=True, capture_output=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_a_tracking_server_killed_mid_sweep(isolated: dict) -> None:
    """The server dies while the sweep's first job trains: that job finishes, keeps its results and
    the sweep stops with one error line naming `robustcnn sync`. With the server back, sync imports
    the job (a second sync adds nothing) and re-running the sweep computes only the other cell."""
    root = isolated["root"]
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    sweep = (
        "run", "-m", "experiment=smoke", "attack=[fgsm]", "training.epochs=4", "eval.attack_samples=32",
        "checks.probe_samples=32", "seed=0,1",
    )  # fmt: skip
    server = _start_server(root, port)
    try:
        job = subprocess.Popen(
            [sys.executable, "-m", "robustcnn.cli", *sweep, "hydra.sweep.dir=sweep"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180
        while _logging_jobs(root / "server.db") < 1 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.1)
        assert _logging_jobs(root / "server.db") == 1, "the sweep's first job never logged"
        _stop(server)  # the first job is training
        stdout, stderr = job.communicate(timeout=600)
    finally:
        _stop(server)
    assert job.returncode == 2, stdout + stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("robustcnn: error:")]
    assert len(errors) == 1 and "robustcnn sync" in errors[0] and "failed during the job" in errors[0]
    assert json.loads((root / "sweep/0/results.json").read_text())["verdict"]
    assert not (root / "sweep/1").exists(), "the sweep stops at the job that lost its store"

    server = _start_server(root, port)
    try:
        first = _cli("sync", "sweep", root=root, env=env)
        again = _cli("sync", "sweep", root=root, env=env)
        rerun = _cli(*sweep, "hydra.sweep.dir=sweep2", root=root, env=env)
        runs = TrackingStore.at(uri).search_runs(TrackingStore.at(uri).ensure_experiment("smoke"))
    finally:
        _stop(server)
    assert first.returncode == 0 and "sync: 1 imported" in first.stdout, first.stdout + first.stderr
    assert again.returncode == 0 and "sync: 0 imported, 1 already present" in again.stdout
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("reused_from=") == 1, "the synced job is reused, the other computed"
    jobs = [r for r in runs if r["tags"].get("robustcnn.sweep") != "true"]
    finished = [r for r in jobs if r["status"] == "FINISHED"]
    assert len(finished) == 2 and len({r["tags"]["robustcnn.job_key"] for r in finished}) == 2
    assert sorted(r["status"] for r in jobs) == ["FAILED", "FINISHED", "FINISHED"]  # + the partial run
    # the first sweep could not close its parent (the server was down): the first command that
    # reached the server again (sync) closed it as FAILED, saying why
    assert "closes it as FAILED" in stderr
    sweeps = [r for r in runs if r["tags"].get("robustcnn.sweep") == "true"]
    parents = {r["tags"]["robustcnn.sweep_dir"]: r for r in sweeps}
    first_parent = parents[str(root / "sweep")]
    assert first_parent["status"] == "FAILED", first_parent
    reason = first_parent["tags"]["robustcnn.close_reason"]
    assert "failed during the job" in reason and "did not answer when the sweep ended" in reason
    assert parents[str(root / "sweep2")]["status"] == "FINISHED"


@pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")  # deployed models still ship in it
def test_an_audit_whose_store_failed_is_imported_by_sync_like_a_live_one(
    isolated: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The audit writes run.json and config.json like a job, so `robustcnn sync` imports it too."""
    import torch

    from robustcnn.jobs.audit import run_audit

    root, store = isolated["root"], isolated["store"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    path = tmp_path / "linear.pt"
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), str(path))
    tiny = ["audit.n_samples=32", "threat.eps=[0,0.3]", "attack=[fgsm]", "checks.probe_samples=32"]
    with monkeypatch.context() as failing:
        _fail_logging_after_the_run_opens(failing)
        _, lost = run_audit(str(path), [*tiny, f"audit.out_dir={root / 'lost'}"])
    meta = json.loads((root / "lost/run.json").read_text())
    assert meta["run_id"] == lost["mlflow_run_id"] and meta["experiment"] == "audit"
    assert TrackingStore.at(store).read_run(meta["run_id"])["status"] == "RUNNING"  # what the dead store left

    first = sync([root / "lost"])
    assert [o.status for o in first] == ["imported"]
    imported = TrackingStore.at(store).read_run(first[0].run_id)
    assert imported["status"] == "FINISHED" and imported["tags"][ORIGINAL_TAG] == meta["run_id"]
    assert TrackingStore.at(store).read_run(meta["run_id"])["status"] == "FAILED"

    _, live = run_audit(str(path), [*tiny, f"audit.out_dir={root / 'live'}"])
    logged = TrackingStore.at(store).read_run(live["mlflow_run_id"])
    assert set(imported["metrics"]) == set(logged["metrics"]) and "gate_passed" not in logged["metrics"]
    for name, value in logged["metrics"].items():
        if not name.startswith(TIMING):
            assert imported["metrics"][name] == pytest.approx(value), name
    assert set(imported["params"]) == set(logged["params"])
    assert {k: imported["tags"][k] for k in ("verdict", "model_sha256", "robustcnn.audit")} == {
        k: logged["tags"][k] for k in ("verdict", "model_sha256", "robustcnn.audit")
    }
    assert [o.status for o in sync([root / "lost", root / "live"])] == ["present", "present"]
