"""The weight cache: trained models keyed by a hash of everything that determines their weights.

Why: a sweep of D defenses x A attacks must train D models, not D x A, and re-running a sweep must
not retrain anything. Entries are safetensors files (no pickle, so a tampered cache cannot run
code) plus a JSON sidecar holding the sha256 of the weights: a truncated or corrupted entry is
detected and treated as a miss, never loaded. Writes go to a temporary file that is atomically
renamed, so a killed process never leaves a half-written entry behind. A per-entry lock file
(:meth:`WeightCache.lock`) lets two processes that miss the same entry at once train it once: the
second waits, then finds the entry the first one saved.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robustcnn.errors import CacheError
from robustcnn.files import HAVE_FLOCK, check_output_folder, exclusive_lock
from robustcnn.hashing import file_sha256

log = logging.getLogger(__name__)

#: Lock files this thread holds (absolute paths): taking one twice would deadlock on flock.
_held = threading.local()
_no_lock_logged = False


def _atomic_write_bytes(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``target`` (same folder, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _held_locks() -> set[str]:
    if not hasattr(_held, "paths"):
        _held.paths = set()
    return _held.paths


def _say_no_lock() -> None:
    """Without fcntl (Windows) entries stay consistent; only duplicate training is possible. Said once."""
    global _no_lock_logged
    if not HAVE_FLOCK and not _no_lock_logged:
        _no_lock_logged = True
        log.debug("no fcntl on this platform: weight cache entries are filled without a lock")


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
        check_output_folder(self.root, "the weight cache folder", "paths.cache_dir (or ROBUSTCNN_CACHE_DIR)")

    def weights_path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def meta_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    @contextmanager
    def lock(self, key: str) -> Iterator[Path]:
        """Hold the cross-process lock of entry ``key`` while checking, training and saving it.

        Why: two sweep workers that miss the same entry at once would otherwise both train it
        (minutes wasted) and race on its files. A killed trainer never leaves a stale lock, and the
        empty lock file stays behind on purpose (:func:`robustcnn.files.exclusive_lock` says why).

        Not reentrant: flock on a second descriptor of the same file blocks even in the same
        process, so taking a key this thread already holds raises instead of hanging.
        """
        path = self.lock_path(key)
        ident = os.path.abspath(path)
        held = _held_locks()
        if ident in held:
            raise CacheError(f"the lock of weight cache entry {key} is already held by this thread ({path})")
        self.ensure_writable()
        _say_no_lock()

        def say_wait() -> None:
            log.info("waiting for another process to finish training weights %s (%s)", key, path)

        with exclusive_lock(path, on_wait=say_wait):
            held.add(ident)
            try:
                yield path
            finally:
                held.discard(ident)  # closing the file releases the flock

    def read_meta(self, key: str) -> dict[str, Any] | None:
        """The sidecar of entry ``key`` (unverified: :meth:`load` checks the weights against it)."""
        try:
            meta = json.loads(self.meta_path(key).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) else None

    def load(self, key: str, model: torch.nn.Module) -> dict[str, Any] | None:
        """Load entry ``key`` into ``model``; ``None`` on a miss or a damaged entry (which is removed)."""
        weights, meta_file = self.weights_path(key), self.meta_path(key)
        if not (weights.exists() and meta_file.exists()):
            return None
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict) or file_sha256(weights) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            state = load_file(str(weights), device="cpu")
            model.load_state_dict(state, strict=True)
        except (SafetensorError, ValueError, OSError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
            log.warning("weight cache entry %s is damaged (%s): discarding it and retraining", key, exc)
            self.discard(key)
            return None
        return meta

    def save(self, key: str, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
        """Store ``model``'s weights under ``key`` with ``meta`` (the sha256 is added here)."""
        self.ensure_writable()
        state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
        digest: list[str] = []

        def write_weights(tmp: str) -> None:
            save_file(state, tmp)
            digest.append(file_sha256(tmp))  # hash what we wrote, not whatever the path holds later

        _atomic_write_bytes(self.weights_path(key), write_weights)
        full_meta = {**meta, "key": key, "sha256": digest[0]}
        text = json.dumps(full_meta, indent=2, sort_keys=True, default=str)
        _atomic_write_bytes(self.meta_path(key), lambda tmp: Path(tmp).write_text(text))
        return self.weights_path(key)

    def discard(self, key: str) -> None:
        """Remove entry ``key``'s weights and sidecar (never its lock file: see :meth:`lock`)."""
        for path in (self.weights_path(key), self.meta_path(key)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
