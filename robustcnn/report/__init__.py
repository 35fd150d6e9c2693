"""The HTML dashboard built from the MLflow store: ``build_report(uri, experiment, out_root)``.

One self-contained page per experiment (``reports/<experiment>/index.html``): leaderboard,
robustness curves, trade-off plot, per-attack breakdown, sanity checks, example grids, configs.
"""

from __future__ import annotations

from robustcnn.report.build import build_report

__all__ = ["build_report"]
