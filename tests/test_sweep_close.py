"""Every sweep's parent run is closed: a store that is down when the sweep ends is waited for, and
if it stays down the close is written down and done by the next robustcnn process that reaches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustcnn.sweeps import callback
from robustcnn.tracking import pending
from robustcnn.tracking.store import TrackingStore
from robustcnn.tracking.sweep_link import SweepLink


def _open_sweep_with_one_job(store: str, root: Path) -> SweepLink:
    sweep_dir = root / "sweep"
    link = callback.open_sweep(store, "close", sweep_dir, ["seed=0,1"], 2)
    (sweep_dir / "0").mkdir()  # Hydra made the first job's folder: a job started
    (sweep_dir / "0/results.json").write_text(json.dumps({"clean_accuracy": 0.5, "mlflow_run_id": "job0"}))
    return link


def _store_down(monkeypatch: pytest.MonkeyPatch, calls: int | None = None) -> None:
    """Every store call fails (or only the first ``calls``), as when the tracking server is gone."""
    real = TrackingStore._call
    failed = [0]

    def refused(self: TrackingStore, what: str, action: object) -> object:
        if calls is None or failed[0] < calls:
            failed[0] += 1
            raise self._error(what, ConnectionError("simulated: connection refused by 127.0.0.1:5000"))
        return real(self, what, action)  # type: ignore[arg-type]

    monkeypatch.setattr(TrackingStore, "_call", refused)


def test_a_parent_the_store_cannot_close_is_closed_failed_with_its_reason_once_the_store_is_back(
    isolated: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    store, root = isolated["store"], isolated["root"]
    parent = _open_sweep_with_one_job(store, root).parent_run_id
    monkeypatch.setattr(callback, "CLOSE_WAIT_S", 0.0)
    with monkeypatch.context() as down:
        _store_down(down)
        callback.close_open_sweeps("FAILED", "a job failed: the MLflow store failed during the job")
    warning = capsys.readouterr().err
    assert f"parent run {parent} was not closed" in warning and "closes it as FAILED" in warning
    assert TrackingStore.at(store).read_run(parent)["status"] == "RUNNING"  # the dead store took nothing
    assert [c.run_id for c in pending.pending_closes(store)] == [parent]
    callback.close_open_sweeps("FAILED")  # on exit again: the deferred parent is not tried twice

    TrackingStore.at(store).ensure_experiment("anything")  # the next robustcnn process on the store
    closed = TrackingStore.at(store).read_run(parent)
    assert closed["status"] == "FAILED"
    reason = closed["tags"][pending.REASON_TAG]
    assert "a job failed: the MLflow store failed during the job" in reason
    assert "did not answer when the sweep ended" in reason and "connection refused" in reason
    assert pending.pending_closes(store) == [] and TrackingStore.at(store).close_deferred_runs() == []


def test_a_store_back_within_the_wait_closes_the_parent_at_once_with_its_summary(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, root = isolated["store"], isolated["root"]
    link = _open_sweep_with_one_job(store, root)
    monkeypatch.setattr(callback, "CLOSE_WAIT_S", 30.0)
    monkeypatch.setattr(callback, "CLOSE_RETRY_S", 0.01)
    with monkeypatch.context() as flaky:
        _store_down(flaky, calls=3)  # down for the first three tries
        closed = callback.end_parent(link, root / "sweep", "KILLED", "interrupted (Ctrl-C or SIGTERM)")
    assert closed is not None and [c["job"] for c in closed[1]] == ["0"]
    run = TrackingStore.at(store).read_run(link.parent_run_id)
    assert run["status"] == "KILLED" and run["tags"][pending.REASON_TAG] == "interrupted (Ctrl-C or SIGTERM)"
    assert pending.pending_closes(store) == [] and (root / "sweep/sweep_summary.json").is_file()


def test_a_deferred_close_survives_a_store_still_down_and_an_unreadable_entry(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = isolated["store"]
    experiment_id = TrackingStore.at(store).ensure_experiment("close")
    run = TrackingStore.at(store).create_run(experiment_id, "parent", {})
    pending.defer_close(pending.PendingClose(store, run, "FAILED", "why"))
    (pending.state_dir() / "pending-closes/broken.json").write_text("{not json")
    with monkeypatch.context() as down:
        _store_down(down)
        assert TrackingStore.at(store).close_deferred_runs() == []
    assert [c.run_id for c in pending.pending_closes(store)] == [run], "kept for the next try"
    assert TrackingStore.at(store).close_deferred_runs() == [run]
    assert TrackingStore.at(store).read_run(run)["status"] == "FAILED"
