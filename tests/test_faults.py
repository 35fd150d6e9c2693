"""Faults around a job's files: a full disk or an unwritable output folder is one clear error
before any work where it can be checked, and a write that fails mid-job loses no results."""

from __future__ import annotations

import errno
import json
import pathlib
from pathlib import Path

import pytest
from test_sync import TINY_JOB

from robustcnn.cli import main
from robustcnn.config import compose
from robustcnn.files import OutputError, check_output_folder
from robustcnn.jobs.dispatch import run_job
from robustcnn.tracking.store import TrackingStore


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in this process; it must exit 2 with one error line and no traceback."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustcnn: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["hydra.run.dir=blocker/run"], {}, "blocker is a file"),
        (["-m", "hydra.sweep.dir=blocker/${now:%H}"], {}, "hydra.sweep.dir"),
        ([], {"ROBUSTCNN_MIN_FREE_MB": "1e12"}, "MB free"),
        ([], {"ROBUSTCNN_MIN_FREE_MB": "lots"}, "ROBUSTCNN_MIN_FREE_MB"),
        (["--config-dir", "no/such/folder"], {}, "--config-dir"),
    ],
    ids=["run dir under a file", "sweep dir under a file", "disk full", "bad floor", "no config dir"],
)
def test_output_problems_stop_the_run_before_any_work(
    args: list[str],
    env: dict[str, str],
    expected: str,
    isolated: dict,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (isolated["root"] / "blocker").write_text("a file where a folder should go")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    line = _cli_error(["run", "experiment=smoke", *args], capsys)
    assert expected in line
    assert not isolated["cache"].exists(), "nothing may be trained before the error"
    assert not (isolated["root"] / "outputs").exists() and not (isolated["root"] / "multirun").exists()


def test_free_space_floor_names_the_folder_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    almost_full = shutil._ntuple_diskusage(10**12, 10**12 - 1024, 1024)  # type: ignore[attr-defined]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: almost_full)
    with pytest.raises(OutputError, match=r"has 0 MB free.*ROBUSTCNN_MIN_FREE_MB") as caught:
        check_output_folder(tmp_path / "not/yet", "the job's output folder", "hydra.run.dir")
    assert str(tmp_path / "not/yet") in str(caught.value)
    monkeypatch.setenv("ROBUSTCNN_MIN_FREE_MB", "0")  # the documented way to turn the check off
    check_output_folder(tmp_path / "not/yet", "the job's output folder", "hydra.run.dir")


def test_a_disk_that_fills_up_mid_job_keeps_the_results_in_the_store(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_text = pathlib.Path.write_text

    def disk_full_for_results(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == ".results.json.tmp":
            real_write_text(self, "{")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full_for_results)
    out = isolated["root"] / "job"
    with pytest.raises(OutputError) as caught:
        run_job(compose(TINY_JOB), output_dir=out, progress=False)
    message = str(caught.value)
    assert "No space left on device" in message and "results.json" in message and "MLflow run" in message
    assert not (out / "results.json").exists() and not (out / ".results.json.tmp").exists()
    run_id = message.split("MLflow run ")[1].split()[0]
    assert TrackingStore.at(isolated["store"]).read_run(run_id)["status"] == "FINISHED"
    stored = TrackingStore.at(isolated["store"]).download_json(run_id, "results.json")
    assert stored["verdict"] and stored["robust_accuracy"]["fgsm"]
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id  # written before the disk filled
    experiment_id = TrackingStore.at(isolated["store"]).ensure_experiment("smoke")
    assert len(TrackingStore.at(isolated["store"]).search_runs(experiment_id)) == 1
