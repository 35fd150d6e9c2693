"""Progress bars for long loops (training epochs, attack batches, sweeps), shown only on a terminal.

Why one helper: every loop that can take minutes shows the same kind of bar, and none of them
writes bar noise into CI logs or files (``enabled`` is false unless stderr is a terminal).
"""

from __future__ import annotations

import sys
from typing import Protocol


class ProgressBar(Protocol):
    """What callers may do with a bar (tqdm's interface)."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


def progress_enabled() -> bool:
    """Bars only when a person watches: stderr is a terminal."""
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "batch") -> ProgressBar | None:
    """A tqdm bar, or None when disabled (callers write ``if bar: bar.update()``)."""
    if not enabled:
        return None
    # tqdm ships no type information (and types-tqdm is no dependency): mypy cannot read it
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc=desc, leave=False, unit=unit, dynamic_ncols=True)
