"""Stable content hashes for configs and files (cache keys, model identities)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def config_hash(payload: object, length: int = 16) -> str:
    """Hash a JSON-serialisable payload independent of key order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of robustcnn's own source: a result computed by other code is not reused.

    Why the source rather than the version string: between releases (and in editable installs)
    the code changes while ``__version__`` does not.
    """
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


#: Config keys that do not change a job's results (where it logs, how many threads, force).
NON_RESULT_KEYS = ("hydra", "tracking", "force", "threads")


def job_key(config: Mapping[str, Any], *, inputs: Mapping[str, Any]) -> str:
    """The identity of a job's results: its resolved config (less bookkeeping), its inputs, the code.

    Why ``inputs``: the config names what a job reads (``data.root=X``, the face assets) but not what
    is in it; the same command on changed images, IDX files or face weights must be recomputed, not
    linked to the old results. ``inputs`` holds the content identity of everything the job reads
    (a dataset's ``DatasetInfo.identity``, a gallery's, a weights file's sha256), as JSON values.
    """
    payload = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    return config_hash({"config": payload, "inputs": dict(inputs), "code": code_version()})
