"""The `robustcnn` command as a user runs it: a real subprocess, a private store and cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustcnn.report.examples import ExampleSet
from robustcnn.tracking.store import TrackingStore


def robustcnn(
    *args: str, cwd: Path, env_extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def _run_id(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("clean_accuracy="))
    return dict(part.split("=", 1) for part in line.split())["run_id"]


@pytest.mark.slow
def test_smoke_experiment_logs_a_run_and_second_run_hits_the_cache(isolated: dict) -> None:
    root: Path = isolated["root"]
    first = robustcnn("run", "experiment=smoke", "attack=pgd", cwd=root)
    assert first.returncode == 0, first.stderr
    assert "cache_hit=False" in first.stdout and "verdict=not_robust evidence=white_box" in first.stdout
    results = TrackingStore.at(isolated["store"]).download_json(_run_id(first.stdout), "results.json")
    for key in (
        "clean_accuracy",
        "model",
        "data",
        "defense",
        "seed",
        "device",
        "eps",
        "robust_accuracy",
        "worst_case_robust_accuracy",
        "attack_success_rate",
        "checks",
        "verdict",
        "timing",
    ):
        assert key in results
    assert set(results["robust_accuracy"]) == {"pgd", "noise"}
    assert not [c for c in results["checks"] if c["passed"] is False], results["checks"]
    assert results["worst_case_robust_accuracy"][-1] <= 0.01  # eps 0.3 on an undefended model
    assert results["clean_accuracy"] > 0.8, results  # 1,000 images, one epoch: a real model, not chance
    assert results["model"] == "lenet5" and results["data"] == "mnist5k" and results["defense"] == "none"
    (kept,) = root.glob("outputs/*/*/examples.safetensors")  # the report draws the grid from it
    examples = ExampleSet.load(kept)
    assert examples.adversarial.shape[:2] == (len(results["eps"]), examples.clean.shape[0])
    # every classifier run: attribution maps of the kept examples (a PNG) and their stability (metrics)
    assert set(results["attributions"]["stability"]) == {"saliency", "integrated_gradients", "grad_cam"}
    (grid,) = root.glob("outputs/*/*/attributions.png")
    assert grid.stat().st_size > 1000
    logged = TrackingStore.at(isolated["store"]).read_run(_run_id(first.stdout))["metrics"]
    assert "attribution_stability/saliency" in logged
    written = list(root.glob("outputs/*/*/results.json"))
    assert written and json.loads(written[0].read_text())["clean_accuracy"] == results["clean_accuracy"]

    second = robustcnn("run", "experiment=smoke", "attack=pgd", "force=true", cwd=root)
    assert second.returncode == 0, second.stderr
    assert "cache_hit=True" in second.stdout and "reused_from" not in second.stdout
    again = TrackingStore.at(isolated["store"]).download_json(_run_id(second.stdout), "results.json")
    assert again["clean_accuracy"] == results["clean_accuracy"], "cached weights must give the same model"

    third = robustcnn("run", "experiment=smoke", "attack=pgd", cwd=root)  # the same job: linked, not rerun
    assert third.returncode == 0, third.stderr
    assert f"reused_from={_run_id(second.stdout)}" in third.stdout

    # the same model with the sanity checks off: no verdict can be given (never robust / not robust)
    unchecked = robustcnn("run", "experiment=smoke", "attack=pgd", "checks.enabled=false", cwd=root)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "verdict=unchecked" in unchecked.stdout, unchecked.stdout
    off = TrackingStore.at(isolated["store"]).download_json(_run_id(unchecked.stdout), "results.json")
    assert off["verdict"] == "unchecked" and off["checks"] == [] and off["probes"] == {}


@pytest.mark.slow
def test_multirun_runs_every_job(isolated: dict) -> None:
    out = robustcnn(
        "run",
        "-m",
        "experiment=smoke",
        "seed=0,1",
        "data.max_train=256",
        "training.max_batches=2",
        cwd=isolated["root"],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("clean_accuracy=") == 2


def test_unknown_choice_lists_the_valid_ones(isolated: dict) -> None:
    out = robustcnn("run", "model=nope", cwd=isolated["root"])
    assert out.returncode == 2
    assert "lenet5" in out.stderr and "madry_cnn" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_unwritable_tracking_store_is_one_line(isolated: dict) -> None:
    blocker = isolated["root"] / "blocker"
    blocker.write_text("x")
    out = robustcnn(
        "run",
        "experiment=smoke",
        cwd=isolated["root"],
        env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{blocker}/sub/mlflow.db"},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("robustcnn: error:")]
    assert len(error_lines) == 1 and "not writable" in error_lines[0]


def test_unwritable_cache_is_one_line(isolated: dict) -> None:
    blocker = isolated["root"] / "blocker"
    blocker.write_text("x")
    out = robustcnn("run", "experiment=smoke", f"paths.cache_dir={blocker}/cache", cwd=isolated["root"])
    assert out.returncode == 2, out.stderr
    assert "paths.cache_dir" in out.stderr and "Traceback" not in out.stderr


def test_bad_value_is_one_line(isolated: dict) -> None:
    out = robustcnn("run", "experiment=smoke", "training.batch_size=0", cwd=isolated["root"])
    assert out.returncode == 2
    assert "training.batch_size" in out.stderr and "Traceback" not in out.stderr


def test_list_and_version(isolated: dict) -> None:
    out = robustcnn("list", cwd=isolated["root"])
    assert out.returncode == 0, out.stderr
    assert "mnist5k" in out.stdout and "lenet5" in out.stdout and "experiment: " in out.stdout
    version = robustcnn("--version", cwd=isolated["root"])
    assert version.returncode == 0 and "robustcnn" in version.stdout
