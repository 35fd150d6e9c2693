"""Opening a sqlite store whose schema another process is creating (robustcnn/tracking/schema.py):
waited for and retried, bounded, one error line when it never settles, created under a lock."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from robustcnn.errors import TrackingError
from robustcnn.tracking import schema
from robustcnn.tracking.schema import creation_lock, open_client, publish, wait_until_settled
from robustcnn.tracking.store import TrackingStore

#: What three ``robustcnn run`` started together on a new store said before (issue 20).
IN_THE_MAKING = "(sqlite3.OperationalError) table _alembic_tmp_metrics already exists"


def complete_store(tmp_path: Path, empty_store: Path) -> str:
    shutil.copy(empty_store, tmp_path / "m.db")
    return f"sqlite:///{tmp_path / 'm.db'}"


def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_s: float) -> tuple[Path, str]:
    """(file, uri) of a store whose schema stands at another revision than this mlflow's newest;
    a schema that stands still for ``quiet_s`` counts as nobody's work in progress."""
    monkeypatch.setattr(schema, "QUIET_S", quiet_s)
    path = tmp_path / "m.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("INSERT INTO alembic_version VALUES ('an_old_revision')")
    connection.close()
    return path, f"sqlite:///{path}"


def test_a_schema_in_the_making_is_retried_until_it_opens(
    tmp_path: Path, empty_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = complete_store(tmp_path, empty_store)
    calls: list[int] = []

    def make_client() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(IN_THE_MAKING)
        return "client"

    with caplog.at_level(logging.INFO, logger="robustcnn.tracking.schema"):
        assert open_client(uri, make_client) == "client"
    assert len(calls) == 3
    said = [r.getMessage() for r in caplog.records if "being created by another process" in r.getMessage()]
    assert len(said) == 1, said  # said once, not once per try


def test_a_schema_that_never_settles_is_one_error_line(
    tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = complete_store(tmp_path, empty_store)
    monkeypatch.setattr(schema, "SCHEMA_WAIT_S", 0.3)
    calls: list[int] = []

    def make_client() -> str:
        calls.append(1)
        raise RuntimeError("(sqlite3.OperationalError) duplicate column name: step")

    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        open_client(uri, make_client)
    assert time.monotonic() - started < 5  # bounded
    assert len(calls) > 1  # retried meanwhile
    message = str(caught.value)
    assert "\n" not in message and uri in message and "duplicate column name" in message
    assert "still being created or upgraded by another process" in message


def test_the_store_says_the_same_line_when_its_schema_never_settles(
    tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through TrackingStore (what every command uses): a TrackingError, i.e. one line and exit 2."""
    import mlflow

    uri = complete_store(tmp_path, empty_store)
    monkeypatch.setattr(schema, "SCHEMA_WAIT_S", 0.2)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(IN_THE_MAKING)

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", broken)
    with pytest.raises(TrackingError, match="still being created or upgraded by another process"):
        TrackingStore.at(uri).ensure_experiment("e")


def test_other_failures_are_not_retried(tmp_path: Path, empty_store: Path) -> None:
    uri = complete_store(tmp_path, empty_store)
    calls: list[int] = []

    def make_client() -> str:
        calls.append(1)
        raise RuntimeError("(sqlite3.OperationalError) unable to open database file")

    with pytest.raises(RuntimeError, match="unable to open"):
        open_client(uri, make_client)
    assert len(calls) == 1


def test_a_schema_still_changing_is_waited_for_until_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process migrating the file (it keeps changing): never handed to mlflow meanwhile."""
    path, uri = old_store(tmp_path, monkeypatch, quiet_s=0.4)
    stop = threading.Event()

    def keep_migrating() -> None:
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE steps (n INTEGER)")
            while not stop.is_set():
                connection.execute("INSERT INTO steps VALUES (1)")
                connection.commit()
                time.sleep(0.03)
        connection.close()

    writer = threading.Thread(target=keep_migrating)
    writer.start()
    try:
        with pytest.raises(TrackingError, match="still being created or upgraded"):
            wait_until_settled(uri, path, deadline=time.monotonic() + 1.2)
    finally:
        stop.set()
        writer.join()


def test_a_schema_that_stands_still_short_of_the_newest_is_left_to_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old store nobody is changing (mlflow upgrades it) is not waited on for SCHEMA_WAIT_S."""
    path, uri = old_store(tmp_path, monkeypatch, quiet_s=0.2)
    started = time.monotonic()
    wait_until_settled(uri, path, deadline=time.monotonic() + 30)
    assert time.monotonic() - started < 5


def test_a_new_store_is_published_whole_and_never_replaces_a_file(tmp_path: Path) -> None:
    path, ours = tmp_path / "m.db", tmp_path / ".m.db.new"
    ours.write_bytes(b"ours")
    publish(ours, path)
    assert path.read_bytes() == b"ours"
    path.unlink()
    path.write_bytes(b"theirs")  # another client created the store first: its file is the store
    publish(ours, path)
    assert path.read_bytes() == b"theirs"


def test_robustcnn_processes_create_a_store_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that is not complete is opened under ``<store>.lock``: while another holds it, we wait."""
    path, uri = old_store(tmp_path, monkeypatch, quiet_s=0.05)
    opened = threading.Event()

    def open_it() -> None:
        open_client(uri, lambda: opened.set())

    with creation_lock(path):
        opener = threading.Thread(target=open_it)
        opener.start()
        assert not opened.wait(1.0), "opened while another process held the creation lock"
    opener.join(timeout=30)
    assert opened.is_set()
    assert (tmp_path / "m.db.lock").is_file()


def test_robustcnn_ui_makes_a_new_store_before_its_server_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``robustcnn ui`` on a new store: the store is whole before mlflow's server first opens it."""
    import robustcnn.tracking.ui as ui
    from robustcnn.cli.command import main

    path = tmp_path / "new" / "mlflow.db"
    seen: list[schema.SchemaState | None] = []
    monkeypatch.setattr(ui, "serve", lambda uri, host, port: seen.append(schema.schema_state(path)))
    main(["ui", "--tracking-uri", f"sqlite:///{path}"])
    assert len(seen) == 1 and seen[0] is not None and seen[0].revision == schema.head_revision()


def test_a_complete_store_is_recognised_whatever_its_folder_is_called(
    tmp_path: Path, empty_store: Path
) -> None:
    """Read as a sqlite URI, a path with ``#``, ``?`` or a space must still name the file, or every
    open of a complete store would wait as if its schema were in the making."""
    folder = tmp_path / "runs #1? été"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    state = schema.schema_state(folder / "mlflow.db")
    assert state is not None and state.revision == schema.head_revision()
