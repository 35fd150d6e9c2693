"""Sweeps: parent/child runs, dedupe and resume, a killed sweep re-run, failures that end the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustcnn.hashing import job_key
from robustcnn.sweeps.callback import count_jobs, defense_label, summary_table
from robustcnn.tracking.store import TrackingStore, absolute_uri, owner_tags

#: A job of a few seconds: lenet5 on 256 images, FGSM+PGD on 64 test images.
TINY = (
    "experiment=smoke",
    "data.max_train=256",
    "training.epochs=1",
    "eval.attack_samples=64",
    "checks.probe_samples=32",
)


def cli(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "robustcnn.cli", *args]


def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args, cwd=cwd), cwd=cwd, text=True, capture_output=True, timeout=timeout)


def runs_by_kind(store: str, experiment: str = "smoke") -> tuple[list[dict], list[dict]]:
    """(parent runs, job runs) of an experiment."""
    runs = TrackingStore.at(store).search_runs(TrackingStore.at(store).ensure_experiment(experiment))
    parents = [r for r in runs if r["tags"].get("robustcnn.sweep") == "true"]
    return parents, [r for r in runs if r not in parents]


def summary_ids(stdout: str, key: str = "run_id") -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("clean_accuracy=")]
    return [dict(part.split("=", 1) for part in line.split()).get(key, "") for line in lines]


# -- units ---------------------------------------------------------------------------------------


def test_job_key_ignores_bookkeeping_but_not_results() -> None:
    base = {"seed": 0, "model": {"name": "lenet5"}, "tracking": {"experiment": "a"}, "threads": 2}
    same = {**base, "tracking": {"experiment": "b"}, "threads": 1, "force": True}
    data = {"data": {"dataset": "mnist5k", "train_sha256": "a1", "test_sha256": "b2"}}
    assert job_key(base, inputs=data) == job_key(same, inputs=data)
    assert job_key(base, inputs=data) != job_key({**base, "seed": 1}, inputs=data)
    assert job_key(base, inputs=data) != job_key({**base, "model": {"name": "madry_cnn"}}, inputs=data)
    # the same config on other data: other results
    other = {"data": {**data["data"], "train_sha256": "a2"}}
    assert job_key(base, inputs=data) != job_key(base, inputs=other)


def test_count_jobs_multiplies_sweep_params_and_overrides() -> None:
    cfg = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"defense": "none,dropout"}},
                "overrides": {"task": ["seed=0,1,2", "x=1"]},
            }
        }
    )
    assert count_jobs(cfg) == 6


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///store/m.db") == f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_summary_table_has_one_row_per_cell() -> None:
    cells = [
        {
            "job": "0",
            "model": "lenet5",
            "defense": "none",
            "clean_accuracy": 0.97,
            "reference_robust_accuracy": 0.0,
            "epoch_cost": 11.43,
            "train_seconds": 546.2,
            "verdict": "not robust",
            "status": "FINISHED",
            "reused": True,
            "run_id": "abc",
        },
        {
            "job": "1",
            "model": None,
            "defense": None,
            "clean_accuracy": None,
            "reference_robust_accuracy": None,
            "verdict": None,
            "status": "FAILED",
            "reused": False,
            "run_id": "def",
        },
    ]
    table = summary_table(cells).strip().splitlines()
    assert len(table) == 4
    assert "0.9700" in table[2] and "FINISHED (reused)" in table[2] and "FAILED" in table[3]
    assert "| 11.4x | 546 |" in table[2] and "| - | - |" in table[3]


def test_defense_label_is_the_preset_and_the_jobs_own_defense_overrides() -> None:
    """Two presets of one defense type (prune_robust, prune_robust_no_finetune) must not share a name."""
    from omegaconf import OmegaConf

    def hydra_cfg(choice: str | None, *task: str) -> object:
        return OmegaConf.create(
            {"runtime": {"choices": {"defense": choice}}, "overrides": {"task": list(task)}}
        )

    chosen = hydra_cfg("prune_robust_no_finetune", "defense=prune_robust_no_finetune", "seed=1")
    assert defense_label(chosen) == "prune_robust_no_finetune"
    varied = hydra_cfg("prune", "defense.sparsity=0.5", "+defense.note=x", "training.epochs=2")
    assert defense_label(varied) == "prune sparsity=0.5 note=x"
    assert defense_label(hydra_cfg(None, "seed=0")) is None


def test_a_basic_sweep_composes_each_job_once(
    isolated: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hydra's batch check and the launch share one composition per job (robustcnn.sweeps.compose_once)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from robustcnn.cli import main

    composed: list[list[str]] = []
    real = ConfigLoaderImpl.load_configuration

    def counting(self: ConfigLoaderImpl, config_name: str | None, overrides: list[str], run_mode: object,
                 from_shell: bool = True, validate_sweep_overrides: bool = True) -> object:
        if from_shell:  # Hydra's own compositions (the first-cell check before Hydra uses its compose API)
            composed.append(list(overrides))
        return real(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counting)
    main(["run", "-m", *TINY, "attack=[]", "seed=0,1,2"])
    per_job = [o for o in composed if any(x in o for x in ("seed=0", "seed=1", "seed=2"))]
    assert sorted(o[-1] for o in per_job) == ["seed=0", "seed=1", "seed=2"], composed
    assert capsys.readouterr().out.count("clean_accuracy=") == 3


def test_report_warm_up_starts_only_after_a_job_that_computed(tmp_path: Path) -> None:
    """A sweep whose jobs were all reused rebuilds no report: it must not load plotly for one."""
    from robustcnn.sweeps.callback import computed

    (tmp_path / "new").mkdir()
    (tmp_path / "new/results.json").write_text(json.dumps({"clean_accuracy": 0.9}))
    (tmp_path / "old").mkdir()
    (tmp_path / "old/results.json").write_text(json.dumps({"clean_accuracy": 0.9, "reused_from": "abc"}))
    assert computed(str(tmp_path / "new"))
    assert not computed(str(tmp_path / "old")) and not computed(str(tmp_path / "missing"))


def test_runs_of_dead_processes_are_marked_killed(isolated: dict) -> None:
    store = isolated["store"]
    experiment_id = TrackingStore.at(store).ensure_experiment("reap")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = TrackingStore.at(store).create_run(experiment_id, "orphan", {"robustcnn.pid": str(dead.pid)})
    alive = TrackingStore.at(store).create_run(experiment_id, "alive", {})  # owned by this (living) process
    assert owner_tags()["robustcnn.pid"] == str(os.getpid())
    assert TrackingStore.at(store).reap_orphaned_runs(experiment_id) == [orphan]
    status = {r["run_id"]: r["status"] for r in TrackingStore.at(store).search_runs(experiment_id)}
    assert status == {orphan: "KILLED", alive: "RUNNING"}


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_parent_children_dedupe_and_force(isolated: dict) -> None:
    root, store = isolated["root"], isolated["store"]
    first = run("run", "-m", *TINY, "seed=0,1", cwd=root)
    assert first.returncode == 0, first.stderr
    parents, jobs = runs_by_kind(store)
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert len(jobs) == 2 and {r["status"] for r in jobs} == {"FINISHED"}
    assert {r["tags"]["mlflow.parentRunId"] for r in jobs} == {parents[0]["run_id"]}
    assert sorted(r["tags"]["robustcnn.job_num"] for r in jobs) == ["0", "1"]
    assert all("seed=" in r["tags"]["robustcnn.overrides"] for r in jobs)
    summary = json.loads(next(root.glob("multirun/*/*/sweep_summary.json")).read_text())
    assert [c["status"] for c in summary["cells"]] == ["FINISHED", "FINISHED"]
    assert [c["defense"] for c in summary["cells"]] == ["none", "none"]
    assert {r["tags"]["defense_label"] for r in jobs} == {"none"}
    assert {c["run_id"] for c in summary["cells"]} == {r["run_id"] for r in jobs}

    again = run("run", "-m", *TINY, "seed=0,1", cwd=root)
    assert again.returncode == 0, again.stderr
    assert sorted(summary_ids(again.stdout, "reused_from")) == sorted(r["run_id"] for r in jobs)
    parents, jobs_after = runs_by_kind(store)
    assert len(jobs_after) == 2, "a finished cell must not be computed or logged twice"
    assert len(parents) == 2 and {p["status"] for p in parents} == {"FINISHED"}

    forced = run("run", "-m", *TINY, "seed=0", "force=true", cwd=root)
    assert forced.returncode == 0, forced.stderr
    assert "reused_from" not in forced.stdout and "cache_hit=True" in forced.stdout
    assert len(runs_by_kind(store)[1]) == 3


def _wait_for_running_job(store: str, job_num: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            _, jobs = runs_by_kind(store)
        except Exception:  # the store is being written: try again
            jobs = []
        if any(r["status"] == "RUNNING" and r["tags"].get("robustcnn.job_num") == job_num for r in jobs):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_num} never started")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_sweep_rerun_computes_only_the_missing_cells(isolated: dict, how: signal.Signals) -> None:
    root, store = isolated["root"], isolated["store"]
    args = ("run", "-m", *TINY, "attack=pgd", "eval.attack_samples=200", "seed=0,1,2")
    proc = subprocess.Popen(
        cli(*args, cwd=root), cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for_running_job(store, "1", proc)
        proc.send_signal(how)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        parents, jobs = runs_by_kind(store)  # a clean exit ends its own runs
        assert [p["status"] for p in parents] == ["KILLED"]
        assert sorted(r["status"] for r in jobs) == ["FINISHED", "KILLED"]
    finished_before = {r["run_id"] for r in runs_by_kind(store)[1] if r["status"] == "FINISHED"}
    assert len(finished_before) == 1

    rerun = run(*args, cwd=root)
    assert rerun.returncode == 0, rerun.stderr
    assert summary_ids(rerun.stdout, "reused_from") == [next(iter(finished_before)), "", ""]
    parents, jobs = runs_by_kind(store)
    assert sorted(p["status"] for p in parents) == ["FINISHED", "KILLED"], "the killed sweep's parent"
    assert sorted(r["status"] for r in jobs) == ["FINISHED", "FINISHED", "FINISHED", "KILLED"]
    finished = [r for r in jobs if r["status"] == "FINISHED"]
    seeds = [json.loads(Path(p).read_text())["seed"] for p in root.glob("multirun/*/*/[0-9]/results.json")]
    assert sorted(seeds) == [0, 0, 1, 2], "first sweep kept job 0; the re-run wrote all three"
    assert len({r["tags"]["robustcnn.job_key"] for r in finished}) == 3, "each cell finished exactly once"


@pytest.mark.slow
def test_a_failing_job_ends_the_parent_as_failed(isolated: dict) -> None:
    root, store = isolated["root"], isolated["store"]
    out = run("run", "-m", *TINY, "data.max_test=0,500", cwd=root)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "robustcnn: error:" in out.stderr
    parents, _ = runs_by_kind(store)
    assert [p["status"] for p in parents] == ["FAILED"]
    error = next(line for line in out.stderr.splitlines() if line.startswith("robustcnn: error:"))
    assert parents[0]["tags"]["robustcnn.close_reason"] == "a job failed: " + error.split("error: ", 1)[1]


def test_sweep_with_an_unknown_choice_fails_before_any_job(isolated: dict) -> None:
    out = run("run", "-m", *TINY, "defense=none,nope", cwd=isolated["root"])
    assert out.returncode == 2
    assert "nope" in out.stderr and "pgd_at" in out.stderr  # the valid options are listed
    assert "clean_accuracy=" not in out.stdout
    assert runs_by_kind(isolated["store"]) == ([], []), "a sweep that started no job leaves no run"


def test_unreachable_tracking_server_stops_the_sweep_before_any_job(isolated: dict) -> None:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens on the discard port
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    root = isolated["root"]
    out = subprocess.run(
        cli("run", "-m", *TINY, "seed=0,1", cwd=root),
        cwd=root,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("robustcnn: error:") == 1 and "127.0.0.1:9" in out.stderr
    assert "Traceback" not in out.stderr and "Launching" not in out.stderr + out.stdout, "no job may start"


def test_a_sweep_cell_is_named_by_its_model_options() -> None:
    """The two poolings of one defense (experiment=regularisation) must not share a summary row's name."""
    from robustcnn.sweeps.callback import _cell

    avg = _cell("1", "r", "FINISHED", {"model": "lenet5", "model_label": "lenet5 pooling=avg"})
    older = _cell("0", "r", "FINISHED", {"model": "lenet5"})  # results written before model_label
    assert avg["model"] == "lenet5 pooling=avg" and older["model"] == "lenet5"
