"""Stable content hashes for configs and files (cache keys, model identities)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def config_hash(payload: Any, length: int = 16) -> str:
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
