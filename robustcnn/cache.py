"""The weight cache: trained models keyed by a hash of everything that determines their weights.

Why: a sweep of D defenses x A attacks must train D models, not D x A, and re-running a sweep must
not retrain anything. Entries are safetensors files (no pickle, so a tampered cache cannot run
code) plus a JSON sidecar holding the sha256 of the weights: a truncated or corrupted entry is
detected and treated as a miss, never loaded. Writes go to a temporary file that is atomically
renamed, so a killed process never leaves a half-written entry behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from robustcnn.errors import CacheError
from robustcnn.hashing import file_sha256

log = logging.getLogger(__name__)


def _atomic_write_bytes(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``target`` (same folder, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class WeightCache:
    """A folder of ``<key>.safetensors`` + ``<key>.json`` entries."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def ensure_writable(self) -> None:
        """Create the folder, or fail with the fix before any training starts."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot create the weight cache folder {self.root} ({exc.strerror}); "
                "set paths.cache_dir (or ROBUSTCNN_CACHE_DIR) to a writable folder"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise CacheError(
                f"the weight cache folder {self.root} is not writable; "
                "set paths.cache_dir (or ROBUSTCNN_CACHE_DIR) to a writable folder"
            )

    def weights_path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def meta_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def read_meta(self, key: str) -> dict[str, Any] | None:
        """The sidecar of entry ``key`` (unverified: :meth:`load` checks the weights against it)."""
        try:
            return json.loads(self.meta_path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def load(self, key: str, model: torch.nn.Module) -> dict[str, Any] | None:
        """Load entry ``key`` into ``model``; ``None`` on a miss or a damaged entry (which is removed)."""
        weights, meta_file = self.weights_path(key), self.meta_path(key)
        if not (weights.exists() and meta_file.exists()):
            return None
        try:
            meta = json.loads(meta_file.read_text())
            if file_sha256(weights) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            state = load_file(str(weights), device="cpu")
            model.load_state_dict(state, strict=True)
        except (ValueError, OSError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
            log.warning("weight cache entry %s is damaged (%s): discarding it and retraining", key, exc)
            self.discard(key)
            return None
        return meta

    def save(self, key: str, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
        """Store ``model``'s weights under ``key`` with ``meta`` (the sha256 is added here)."""
        self.ensure_writable()
        weights = self.weights_path(key)
        state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
        _atomic_write_bytes(weights, lambda tmp: save_file(state, tmp))
        full_meta = {**meta, "key": key, "sha256": file_sha256(weights)}
        text = json.dumps(full_meta, indent=2, sort_keys=True, default=str)
        _atomic_write_bytes(self.meta_path(key), lambda tmp: Path(tmp).write_text(text))
        return weights

    def discard(self, key: str) -> None:
        for path in (self.weights_path(key), self.meta_path(key)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
