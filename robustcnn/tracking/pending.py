"""Runs a process could not close because their store did not answer: closed when it answers again.

Why: a sweep's parent run is ended by the sweep's own process, at its end. When the tracking store
is down then (a server restarting, a network drop, a sqlite file on a lost mount), that process
exits with the run still RUNNING, and nothing in the store says why. So the close is written down
here, one small JSON file per run in a folder of this machine, and the next robustcnn process that
reaches the same store (a job, a sweep, an audit, ``robustcnn sync``) ends the run with the status
and the reason recorded (:meth:`robustcnn.tracking.store.TrackingStore.close_deferred_runs`).
One file per run, written atomically: two processes never edit one shared list, and closing a run
twice is harmless (only a RUNNING run is ended).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from robustcnn.files import write_failure, write_json

log = logging.getLogger(__name__)

#: The tag that says why a run was closed by someone other than the process that ran it.
REASON_TAG = "robustcnn.close_reason"
#: Where deferred closes are kept (default: $XDG_STATE_HOME/robustcnn, else ~/.local/state/robustcnn).
ENV_STATE_DIR = "ROBUSTCNN_STATE_DIR"


@dataclass(frozen=True)
class PendingClose:
    """A run to end once its store answers: which store, which run, as what, and why."""

    uri: str
    run_id: str
    status: str
    reason: str


def state_dir() -> Path:
    """This machine's robustcnn state folder ($ROBUSTCNN_STATE_DIR > $XDG_STATE_HOME > ~/.local/state)."""
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "robustcnn"


def _folder() -> Path:
    return state_dir() / "pending-closes"


def defer_close(close: PendingClose) -> Path:
    """Write the close down (atomically); returns the file. An OutputError names a folder it cannot write."""
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(folder, exc) from exc
    write_json(folder, f"{close.run_id}.json", asdict(close))
    return folder / f"{close.run_id}.json"


def pending_closes(uri: str) -> list[PendingClose]:
    """The closes waiting for the store at ``uri`` (an unreadable file is skipped, with a warning)."""
    folder = _folder()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            close = PendingClose(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping the unreadable deferred close %s (%s)", path, exc)
            continue
        if close.uri == uri:
            found.append(close)
    return found


def forget(close: PendingClose) -> None:
    """The close is done (or its run is gone): remove its file."""
    (_folder() / f"{close.run_id}.json").unlink(missing_ok=True)
