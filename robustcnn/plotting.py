"""Saving matplotlib figures, the one way every picture of robustcnn is written.

Every figure is built as a bare ``matplotlib.figure.Figure`` rendered by the Agg canvas, never through
``matplotlib.pyplot``: pyplot keeps a global registry of open figures and a process-wide backend, so
using it from a library leaks figures when a caller forgets ``plt.close`` and races when parallel
workers (threads of one sweep) draw at the same time. A bare Figure is an ordinary object that the
garbage collector frees once the function returns, and nothing here changes the caller's backend.

Files are written to a temporary name in the target folder and then renamed into place, so a reader
(an MLflow artifact upload, a second worker) never sees a half-written PNG.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def save_figure(fig: Figure, path: str | Path, tight: bool = True) -> Path:
    """Render ``fig`` to ``path`` as PNG atomically (temp file + rename), creating parent folders.

    ``tight`` crops to the drawn artists (so an outside legend is kept), at the price of a second draw
    pass; figures laid out by hand pass False.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot manager, no global registry
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if tight:
                fig.savefig(handle, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
            else:
                fig.savefig(handle, format="png", dpi=DPI)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
