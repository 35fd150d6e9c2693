"""Opening a local sqlite store whose schema may be in the making, by robustcnn or by anyone else.

Why: mlflow creates a sqlite store's schema the first time a client opens the file, with dozens of
alembic migrations that are not atomic on sqlite. Two processes that open one new file at once both
run them; one or both die (``table _alembic_tmp_metrics already exists``, ``duplicate column name:
step``, ``Online migration expected to match one row``), and a process that dies midway can leave
the file half-migrated. Three ``robustcnn run`` started together, or a sweep started beside an
``mlflow ui`` on a new store, lost their jobs that way. So, for a local sqlite store:

- a store whose schema is complete (the common case) is opened at once, with no lock and no wait;
- otherwise robustcnn's processes take a file lock next to it (``<file>.lock``), so they create or
  upgrade it one at a time;
- a new store is built in a private file beside it and published with a hard link that never
  replaces a file: a client that is not robustcnn (``mlflow ui``, a script calling
  ``mlflow.search_runs``) and opens the path meanwhile never meets our migrations half-done, and if
  it created the file first, its migrations run alone;
- a schema another process is changing (its revision, size or journal moves) is waited for, and an
  error that says the schema is in the making is retried; both end after :data:`SCHEMA_WAIT_S` with
  one line naming the store and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from robustcnn.errors import TrackingError
from robustcnn.files import exclusive_lock
from robustcnn.interrupts import raise_if_requested

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a store may stay in the making (another process migrating it) before we give up.
SCHEMA_WAIT_S = 120.0
#: A schema short of the newest revision that has not changed for this long is nobody's work in
#: progress: mlflow may create or upgrade it (an old store, or an empty file someone touched).
#: Generous because another client may pause between creating the file and its first migration
#: (importing alembic on a busy machine); only a store left half-made ever waits this long.
QUIET_S = 5.0
#: How often a schema in the making is looked at.
POLL_S = 0.1
#: What mlflow, alembic and sqlite say when a schema is being created by another process at once.
IN_THE_MAKING = (
    "already exists",
    "duplicate column",
    "no such table",
    "no such column",
    "database is locked",
    "online migration expected",
    "unique constraint failed",
)


def sqlite_file(uri: str) -> Path | None:
    """The file of a local sqlite store (``sqlite:///abs/path``), else None (a server, another database)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest schema revision this mlflow knows (what a complete store is at)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return str(_get_latest_schema_revision())


@dataclass(frozen=True)
class SchemaState:
    """What a store file looks like from outside: its schema revision (None: none yet) and whether
    it is changing (size, modification time, a rollback journal beside it)."""

    revision: str | None
    size: int
    mtime_ns: int
    journal: bool


def schema_state(path: Path) -> SchemaState | None:
    """The store file's state, read-only and without waiting on locks; None when there is no file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    revision = None
    with contextlib.suppress(sqlite3.Error):  # no table yet, or a writer holds the file: no revision
        # as_uri percent-encodes the path: a folder named "a#b" or "runs?" is still this file
        connection = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=0.05)
        try:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = str(row[0]) if row else None
        finally:
            connection.close()
    journal = path.with_name(path.name + "-journal").exists()
    return SchemaState(revision, stat.st_size, stat.st_mtime_ns, journal)


def in_the_making(exc: BaseException) -> bool:
    """Does this failure (or one it was raised from) say the schema is being created elsewhere?"""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if any(sign in text for sign in IN_THE_MAKING):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def never_settled(uri: str, path: Path, detail: str) -> TrackingError:
    """The one line said when a store stayed in the making for :data:`SCHEMA_WAIT_S`."""
    return TrackingError(
        f"the MLflow store {uri} is still being created or upgraded by another process after "
        f"{SCHEMA_WAIT_S:.0f} s ({detail}); let that process finish and run again, or, if none is "
        f"running, move {path} away (a new store is made) or run `mlflow db upgrade {uri}`"
    )


def create_privately(path: Path) -> None:
    """Build a whole new schema in a private file beside ``path``, then link it in if ``path`` is free.

    Why not in place: another client opening the path while our migrations run would run its own on
    the same file. The hard link never replaces a file: when another client created the path first,
    its store is the one used (and waited for).
    """
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, private = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    os.close(fd)
    try:
        engine = create_sqlalchemy_engine(f"sqlite:///{private}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        publish(Path(private), path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(private)


def publish(private: Path, path: Path) -> None:
    """Give the finished store its name, unless a file already has it (then that store is used)."""
    try:
        os.link(private, path)
    except FileExistsError:
        return
    except OSError:  # a filesystem without hard links: a rename, which a racing creator may still beat
        if not path.exists():
            os.replace(private, path)


def wait_until_settled(uri: str, path: Path, deadline: float) -> None:
    """Return once the schema is complete, or has stood still for :data:`QUIET_S` (nobody's work in
    progress: mlflow may create or upgrade it); raise the one-line error at ``deadline``."""
    head = head_revision()
    last: SchemaState | None = None
    still_since = time.monotonic()
    while True:
        state = schema_state(path)
        if state is None or state.revision == head:
            return
        now = time.monotonic()
        if state != last:
            last, still_since = state, now
        elif now - still_since >= QUIET_S:
            return
        if now >= deadline:
            raise never_settled(uri, path, f"its schema is at revision {state.revision}, not {head}")
        raise_if_requested()  # the wait runs with stops held (store.py): Ctrl-C ends it here
        time.sleep(POLL_S)


@contextlib.contextmanager
def creation_lock(path: Path) -> Iterator[None]:
    """Hold ``<store file>.lock`` (robustcnn's processes create a store one at a time).

    A folder where the lock file cannot be made (read-only) holds a store nobody can create or
    upgrade either, so the block then runs without the lock.
    """
    lock = path.with_name(path.name + ".lock")

    def say_wait() -> None:
        log.info("waiting for another robustcnn process to create the MLflow store %s", path)

    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            stack.enter_context(exclusive_lock(lock, on_wait=say_wait))
        yield


def _open_once(uri: str, path: Path, make_client: Callable[[], T], deadline: float) -> T:
    """One try: at once for a complete store, else under the lock (create it privately, wait for it)."""
    state = schema_state(path)
    if state is not None and state.revision == head_revision():
        return make_client()
    with creation_lock(path):
        if schema_state(path) is None:
            create_privately(path)
        wait_until_settled(uri, path, deadline)
        return make_client()


def open_client(uri: str, make_client: Callable[[], T]) -> T:
    """``make_client()`` for the store at ``uri``, once its schema is safe to open (see the module).

    Stores that are not local sqlite files are opened as they are. A failure that says the schema is
    in the making is retried until :data:`SCHEMA_WAIT_S` has passed; any other failure is raised.
    """
    path = sqlite_file(uri)
    if path is None:
        return make_client()
    deadline = time.monotonic() + SCHEMA_WAIT_S
    said = False
    while True:
        try:
            return _open_once(uri, path, make_client, deadline)
        except Exception as exc:  # mlflow, alembic and sqlalchemy raise many types
            if not in_the_making(exc):
                raise
            if time.monotonic() >= deadline:
                raise never_settled(uri, path, " ".join(str(exc).split())[:200]) from exc
            if not said:
                said = True
                log.info("the MLflow store %s is being created by another process: waiting for it", uri)
            raise_if_requested()  # the wait runs with stops held (store.py): Ctrl-C ends it here
            time.sleep(POLL_S)
