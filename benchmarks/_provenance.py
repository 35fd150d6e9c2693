"""Who wrote a benchmark JSON, and a digest that shows it was not edited by hand afterwards.

Why: a figure in reports/ is only evidence when the script that measured it wrote the whole file.
Every report carries ``written_by`` (the script, its arguments, the commit and whether the checkout
had local changes, the load average when the script started and when it wrote, its CPU time across
all threads) and ``sha256``, the digest of everything else. A field added or a number changed by hand
no longer matches the digest, and the test on reports/ (tests/test_readme_figures.py) fails.

The digest is not a signature: whoever edits a file can recompute it. It keeps honest mistakes (a
figure pasted in from another run, a note typed into a field) out of files that claim to be measured.
No torch import here: the README tool and its test read reports without loading a model library.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The key that holds the digest; every other key of the payload is covered by it.
DIGEST_KEY = "sha256"

#: When this module was first imported: a benchmark imports it (through _report) before any work.
_STARTED_UNIX = time.time()
_LOAD_AT_START = [round(v, 2) for v in os.getloadavg()]


def content_digest(payload: dict[str, Any]) -> str:
    """sha256 of the payload without its digest, as canonical JSON (sorted keys, no spaces)."""
    body = {key: value for key, value in payload.items() if key != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stamp(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with ``written_by`` (this process) and its digest added."""
    stamped = {**payload, "written_by": written_by()}
    stamped[DIGEST_KEY] = content_digest(stamped)
    return stamped


def verify(payload: dict[str, Any]) -> str | None:
    """Why the payload is not a script-written report (no stamp, or a digest that does not match)."""
    if "written_by" not in payload or DIGEST_KEY not in payload:
        return "no written_by/sha256 stamp: not written by benchmarks/_report.write_report"
    if payload[DIGEST_KEY] != content_digest(payload):
        return "its sha256 does not match its content: a field was changed after the script wrote it"
    return None


def cpu_seconds() -> float:
    """CPU seconds of this process over all its threads (user + system): what a busy machine inflates
    far less than wall time, since time waiting for a core is not counted."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def written_by() -> dict[str, Any]:
    """The script and arguments, the code it ran (commit, local changes) and what it cost."""
    script = Path(sys.argv[0])
    return {
        "script": script.name if script.name else None,
        "argv": sys.argv[1:],
        **_code_at_start(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(_STARTED_UNIX)),
        "wall_seconds": round(time.time() - _STARTED_UNIX, 2),
        "cpu_seconds": round(cpu_seconds(), 2),
        "load_average_at_start": _LOAD_AT_START,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }


@functools.lru_cache(maxsize=1)
def _code_at_start() -> dict[str, Any]:
    """The code the benchmark runs: read once, when it starts (module import), not when it writes.

    Why: a benchmark runs for up to an hour; a commit made meanwhile in the same checkout would
    otherwise be stamped on figures measured with the code before it.
    """
    return _commit(Path(sys.argv[0]).resolve().parent)


def _commit(where: Path) -> dict[str, Any]:
    """The checkout's commit and whether its code had uncommitted changes (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # the code only: a report being rewritten is itself a change, and says nothing about the code
    code = (":/robustcnn", ":/benchmarks", ":/conf", ":/pyproject.toml")
    status = git("status", "--porcelain", "--untracked-files=no", "--", *code) if commit else None
    return {"commit": commit, "uncommitted_changes": bool(status) if status is not None else None}


_code_at_start()  # read at import, when the benchmark starts (see its docstring)
