"""Where results are written: output folders checked before any work, safe names, atomic JSON files.

Why before: a job that trains for an hour and then cannot write its results has lost the hour.
A folder that does not exist yet is judged by its nearest existing parent (that is where it will
be created). The free-space floor is ``ROBUSTCNN_MIN_FREE_MB`` (default 50 MB: a job writes a few
MB of results and plots, a cache entry a few MB of weights); 0 turns the check off.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX (Linux, macOS)
    import fcntl
except ImportError:  # Windows: no flock; callers say what that costs them
    HAVE_FLOCK = False
else:
    HAVE_FLOCK = True

from robustcnn.errors import RobustCNNError

DEFAULT_MIN_FREE_MB = 50


class OutputError(RobustCNNError):
    """An output folder cannot be created or written, or its disk is (nearly) full."""


def min_free_bytes() -> int:
    raw = os.environ.get("ROBUSTCNN_MIN_FREE_MB", str(DEFAULT_MIN_FREE_MB))
    try:
        return max(0, int(float(raw) * 1024 * 1024))
    except ValueError as exc:
        raise OutputError(f"ROBUSTCNN_MIN_FREE_MB={raw!r} is not a number of megabytes; set e.g. 50") from exc


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created empty if needed) for the ``with`` block.

    Why flock: the kernel releases it when its holder dies, so a killed process never leaves a stale
    lock. The empty file stays behind on purpose: deleting a file another process holds or waits on
    would let a third process lock a new file of the same name, and the lock would exclude nobody.
    ``on_wait`` is called once, before blocking, when another process holds the lock. Without
    fcntl (Windows) the block runs unlocked. Raises OSError when the file cannot be opened.
    """
    with open(path, "ab") as handle:  # append: never truncates; the file only carries the lock
        if HAVE_FLOCK:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the flock


def nearest_existing(path: Path) -> Path:
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_folder(path: str | os.PathLike[str], what: str, setting: str) -> None:
    """Fail with the fix unless ``path`` can be created and written and its disk has room.

    ``what`` names the folder for the user ("the job's output folder"), ``setting`` the option
    that moves it ("hydra.run.dir").
    """
    folder = Path(path)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(
            f"{what} {folder} cannot be created: {existing} is a file, not a folder; set {setting} elsewhere"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder} is not writable ({existing}); set {setting} to a writable folder")
    floor = min_free_bytes()
    if floor:
        free = shutil.disk_usage(existing).free
        if free < floor:
            raise OutputError(
                f"the disk holding {what} {folder} has {free / 2**20:.0f} MB free, under the "
                f"{floor / 2**20:.0f} MB a job needs; free some space, set {setting} to another disk, "
                "or lower ROBUSTCNN_MIN_FREE_MB"
            )


def write_failure(path: Path, exc: OSError) -> OutputError:
    """A write that failed mid-job (disk full, folder removed): the message names the file and fix."""
    return OutputError(
        f"cannot write {path} ({exc.strerror or exc}); free space on its disk or choose another output folder"
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str, fallback: str = "unnamed") -> str:
    """``name`` reduced to a safe single path component (``fallback`` when nothing is left).

    Why one rule: experiment and model names become folders, and such a string can hold ``/``,
    ``..`` or control characters; only ``[A-Za-z0-9._-]`` survive, runs of anything else become one
    ``_``, and leading/trailing dots go (so ``..`` cannot survive).
    """
    return _UNSAFE.sub("_", name).strip("._") or fallback


def write_json(out: Path | None, name: str, data: dict[str, Any]) -> None:
    """A JSON file in a job's output folder (``results.json``, ``run.json``, ``config.json``).

    Why they matter: they outlive the tracking store; ``robustcnn sync`` rebuilds a run from them
    when the store was unreachable while the job ran. Written atomically (never half a file).
    """
    if out is None:
        return
    target = out / name
    tmp = target.with_name(f".{name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(target, exc) from exc
