"""Load: sweeps of 50 tiny jobs through the joblib launcher, all writing to one sqlite store.

Opt-in (``pytest --soak`` or ``make soak``; minutes on 2 cores). Two runs:

- 2 workers: every run lands exactly once, and the parent process's memory stays flat while the
  jobs go by.
- 4 workers while a reader (``robustcnn report``) rebuilds the dashboard in a loop from the same
  store: nothing is lost, no report fails, and every report is consistent (its finished runs never
  go down, never exceed the jobs, and the last one counts every job).

The figures of both are written, whole, to the file ``ROBUSTCNN_SOAK_REPORT`` names
(``make soak``: ``reports/benchmarks/soak.json``) once the module's tests ran.
``ROBUSTCNN_SOAK_JOBS`` sets a smaller sweep for a quick try of the test itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_sync import TINY_JOB

from robustcnn.tracking.store import TrackingStore

JOBS = int(os.environ.get("ROBUSTCNN_SOAK_JOBS", "50"))
#: What the parent may grow while 40 jobs run (allocator noise; a leak of 1 MB a job would be 40).
MAX_GROWTH_MB = 20
#: The dashboard's own count of what it shows (robustcnn.report.page).
PAGE_COUNTS = re.compile(r"(\d+) finished run\(s\), (\d+) face-patch, (\d+) incomplete, (\d+) skipped")

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the parent's memory from /proc"),
]


@pytest.fixture(scope="module")
def soak_figures() -> Iterator[dict[str, Any]]:
    """Each test adds its figures; the whole file is written once they all ran."""
    figures: dict[str, Any] = {}
    yield figures
    if figures and os.environ.get("ROBUSTCNN_SOAK_REPORT"):
        Path(os.environ["ROBUSTCNN_SOAK_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _sweep(root: Path, workers: int, sweep_dir: str) -> tuple[float, list[tuple[float, int, float]]]:
    """Run the sweep; return its wall time and (seconds, jobs done, parent RSS MB) samples."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    command = [
        sys.executable, "-m", "robustcnn.cli", "run", "-m", *TINY_JOB, f"seed=range(0,{JOBS})",
        "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    started = time.monotonic()
    parent = subprocess.Popen(command, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int, float]] = []
    while parent.poll() is None:
        rss = _rss_mb(parent.pid)
        if rss is not None:
            done = len(list(root.glob(f"{sweep_dir}/*/results.json")))
            samples.append((time.monotonic() - started, done, rss))
        time.sleep(0.5)
    _, stderr = parent.communicate()
    assert parent.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr and "robustcnn: error" not in stderr, stderr[-4000:]
    return time.monotonic() - started, samples


def _sweep_figures(workers: int, load: float, wall: float) -> dict[str, Any]:
    """What every soak reports: its size, how busy the machine was when it started, its time."""
    return {
        "jobs": JOBS,
        "workers": workers,
        "load_average_1min_at_start": round(load, 2),
        "wall_seconds": round(wall, 1),
        "seconds_per_job": round(wall / JOBS, 2),
    }


def _every_run_once(store: str, root: Path, sweep_dir: str) -> None:
    """Nothing lost, nothing twice: one FINISHED child per job, and each job's results name its run."""
    runs = TrackingStore.at(store).search_runs(TrackingStore.at(store).ensure_experiment("smoke"))
    children = [r for r in runs if r["tags"].get("robustcnn.sweep") != "true"]
    parents = [r for r in runs if r["tags"].get("robustcnn.sweep") == "true"]
    assert len(children) == JOBS and {r["status"] for r in children} == {"FINISHED"}
    assert sorted(int(r["tags"]["robustcnn.job_num"]) for r in children) == list(range(JOBS))
    assert [r["status"] for r in parents] == ["FINISHED"]
    results = [json.loads(p.read_text()) for p in root.glob(f"{sweep_dir}/*/results.json")]
    assert sorted(r["mlflow_run_id"] for r in results) == sorted(r["run_id"] for r in children)


def test_fifty_jobs_two_workers_every_run_once_and_flat_parent_memory(
    isolated: dict, soak_figures: dict[str, Any]
) -> None:
    root, store = isolated["root"], isolated["store"]
    load = os.getloadavg()[0]
    wall, samples = _sweep(root, 2, "soak")
    _every_run_once(store, root, "soak")

    # while the jobs run (from the 10th result to the last): what grows per job; the sweep's end
    # (summary, dashboard: plotly and the store read once) is a fixed cost reported on its own
    during = [rss for _, done, rss in samples if 10 <= done < JOBS]
    assert during, "the sampler missed the sweep"
    growth = max(during) - during[0]
    figures = {
        **_sweep_figures(2, load, wall),
        "parent_rss_mb_after_10_jobs": round(during[0], 1),
        "parent_rss_mb_before_the_last_job": round(during[-1], 1),
        "parent_growth_mb_during_jobs": round(growth, 1),
        "parent_growth_mb_per_job": round(growth / (JOBS - 10), 3),
        "parent_rss_mb_peak_with_report": round(max(rss for _, _, rss in samples), 1),
    }
    print(json.dumps(figures))
    soak_figures["two_workers"] = figures
    assert growth < MAX_GROWTH_MB, figures


def _read_report(root: Path, store: str) -> dict[str, Any]:
    """One ``robustcnn report`` of the experiment, as a user runs it: exit code, time, the page's counts."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "report", "--experiment", "smoke",
         "--tracking-uri", store, "--out", str(root / "reader")],
        cwd=root, text=True, capture_output=True, timeout=600,
    )  # fmt: skip
    seconds = time.monotonic() - started
    read: dict[str, Any] = {"code": out.returncode, "stderr": out.stderr, "seconds": seconds}
    page = root / "reader/smoke/index.html"
    found = PAGE_COUNTS.search(page.read_text()) if out.returncode == 0 and page.is_file() else None
    if found:
        names = ("finished", "face_patch", "incomplete", "skipped")
        read.update(zip(names, map(int, found.groups()), strict=True))
    return read


def _in_a_loop(
    read: Callable[[], dict[str, Any]], stop: threading.Event, reads: list[dict[str, Any]]
) -> None:
    """The reader: one report after another until the sweep ends."""
    while not stop.is_set():
        reads.append(read())


def test_fifty_jobs_four_workers_with_a_report_reading_the_store_in_a_loop(
    isolated: dict, soak_figures: dict[str, Any]
) -> None:
    root, store = isolated["root"], isolated["store"]
    TrackingStore.at(store).ensure_experiment("smoke")  # the reader's first report finds the experiment
    load = os.getloadavg()[0]
    stop, reads = threading.Event(), []
    reader = threading.Thread(target=_in_a_loop, args=(lambda: _read_report(root, store), stop, reads))
    reader.start()
    try:
        wall, _ = _sweep(root, 4, "soak4")
    finally:
        stop.set()
        reader.join()
    _every_run_once(store, root, "soak4")
    last = _read_report(root, store)

    failed = [r for r in reads if r["code"] != 0 or "finished" not in r or "Traceback" in r["stderr"]]
    assert not failed, failed[0]["stderr"][-3000:]
    assert len(reads) >= 2, "the reader must overlap the sweep"
    finished = [r["finished"] for r in reads]
    assert finished == sorted(finished), f"a finished run disappeared from a report: {finished}"
    assert all(r["finished"] + r["incomplete"] <= JOBS and r["skipped"] <= 1 for r in reads), reads
    assert last["code"] == 0 and (last["finished"], last["incomplete"]) == (JOBS, 0), last
    figures = {
        **_sweep_figures(4, load, wall),
        "reports_during_sweep": len(reads),
        "report_errors": len(failed),
        "report_seconds_mean": round(sum(r["seconds"] for r in reads) / len(reads), 1),
        "finished_runs_seen_by_reports": finished,
        "finished_runs_in_the_last_report": last["finished"],
    }
    print(json.dumps(figures))
    soak_figures["four_workers_with_reader"] = figures
