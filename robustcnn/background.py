"""Slow imports paid on a background thread while a job or sweep computes, once per process.

Why: a library loaded only at the end (plotly for the sweep's report, captum for a job's attribution
maps) adds its import time to what the user waits for. Jobs spend their time inside torch, which
releases the GIL, so the same import on a daemon thread started early costs nothing visible. Python's
import lock makes a later import of the same module wait for the thread's, never repeat it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundLoad:
    """``load`` run once on a daemon thread named ``name``: :meth:`start` begins it, :meth:`wait` joins it."""

    def __init__(self, name: str, load: Callable[[], object]) -> None:
        self.name, self.load = name, load
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Begin loading (later calls do nothing)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self.load, name=self.name, daemon=True)
                self._thread.start()

    def wait(self) -> None:
        """Block until a started load has finished (at once when none was started)."""
        thread = self._thread
        if thread is not None:
            thread.join()
