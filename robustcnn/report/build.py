"""``build_report``: one self-contained ``<out_root>/<experiment>/index.html`` per experiment.

The orchestration only: store.py reads, records.py sorts runs into sections, tables.py and
charts.py compute, page.py renders. Artifacts are downloaded only for finished job runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from robustcnn.errors import ReportError
from robustcnn.files import safe_file_name
from robustcnn.report import store, warmup
from robustcnn.report.charts import (
    defense_comparison,
    minimal_perturbation_boxes,
    overlaid_curves,
    robustness_curves,
    tradeoff,
)
from robustcnn.report.figures import GRID_VERSION
from robustcnn.report.page import render
from robustcnn.report.records import ExperimentRuns, split_runs

INDEX = "index.html"


def folder_name(experiment: str, experiment_id: str) -> str:
    """The experiment's folder under out_root: its name when that is a safe file name.

    Names with other characters (``/``, spaces, ``..``) are made safe and get the experiment id
    appended, so two such names never share a folder and nothing is written outside out_root.
    """
    safe = safe_file_name(experiment, "experiment")
    return safe if safe == experiment else f"{safe}-{experiment_id}"


def plotly_js() -> str:
    """The plotly.js bundle that ships inside the plotly package (no CDN, no download)."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    if "</script" in js.lower():  # would end the <script> element early
        raise ReportError("the installed plotly.js contains '</script' and cannot be embedded; reinstall it")
    return js


#: The report's own cache of finished runs (results, config, the drawn example grid), per experiment;
#: versioned with the grid's drawing, so a change to how grids look never shows stale pictures.
CACHE = f".runs/grid-{GRID_VERSION}"


def collect(uri: str, name: str, experiment_id: str, cache: Path | None = None) -> ExperimentRuns:
    """Read an experiment's runs and the artifacts of its finished job runs (cached in ``cache``)."""
    records = store.runs(uri, experiment_id)
    for record in records:
        if record.needs_artifacts:
            store.attach_artifacts(uri, record, cache)
    return split_runs(name, records)


def write_page(runs: ExperimentRuns, folder: Path, uri: str, js: str) -> Path:
    """Render and write atomically (a browser reloading the page never sees half a file)."""
    charts = robustness_curves(runs.finished)
    done = runs.finished
    extras = [defense_comparison(done), overlaid_curves(done), tradeoff(done)]
    for extra in [*extras, minimal_perturbation_boxes(done)]:
        if extra is not None:
            charts.append(extra)
    html_text = render(
        runs, charts, js, store=store.display_uri(uri), generated=time.strftime("%Y-%m-%d %H:%M:%S %Z")
    )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / INDEX
    partial = folder / f".{INDEX}.{os.getpid()}.tmp"
    partial.write_text(html_text, encoding="utf-8")
    os.replace(partial, target)
    return target


def build_report(tracking_uri: str, experiment: str | None, out_root: Path) -> list[Path]:
    """Write ``out_root/<experiment>/index.html`` for one experiment (None: every one with runs).

    Raises :class:`ReportError` when the store or the named experiment does not exist (the message
    lists the experiments that do), or when ``experiment`` is None and the store has no runs.
    """
    out_root = Path(out_root)
    warmup.wait()  # a sweep may be loading plotly on another thread (report.warmup)
    known = store.experiments(tracking_uri)
    if experiment is not None:
        chosen = {experiment: store.experiment_id(tracking_uri, experiment)}
    else:
        chosen = {name: eid for name, eid in sorted(known.items()) if store.has_runs(tracking_uri, eid)}
        if not chosen:
            raise ReportError(
                f"the MLflow store {store.display_uri(tracking_uri)!r} has no runs yet (experiments: "
                f"{', '.join(sorted(known)) or 'none'}); run a job first, "
                "e.g. `robustcnn run experiment=smoke`"
            )
    js = plotly_js()
    written = []
    for name, eid in chosen.items():
        folder = out_root / folder_name(name, eid)
        runs = collect(tracking_uri, name, eid, cache=folder / CACHE)
        written.append(write_page(runs, folder, tracking_uri, js))
    return written
