"""Load: a sweep of 50 tiny jobs through the joblib launcher with 2 workers.

Opt-in (``pytest --soak`` or ``make soak``; ~4 minutes on 2 cores): every run lands exactly once,
and the parent process's memory stays flat while the jobs go by. The figures are written to
``reports/benchmarks/soak.json`` when ``ROBUSTCNN_SOAK_REPORT`` names a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sync import TINY_JOB

from robustcnn.tracking.store import TrackingStore

JOBS = 50
#: What the parent may grow while 40 jobs run (allocator noise; a leak of 1 MB a job would be 40).
MAX_GROWTH_MB = 20


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@pytest.mark.soak
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the parent's memory from /proc")
def test_fifty_jobs_two_workers_every_run_once_and_flat_parent_memory(isolated: dict) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    root, store = isolated["root"], isolated["store"]
    command = [
        sys.executable, "-m", "robustcnn.cli", "run", "-m", *TINY_JOB, f"seed=range(0,{JOBS})",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=soak",
    ]  # fmt: skip
    started = time.monotonic()
    parent = subprocess.Popen(command, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int, float]] = []  # (seconds, jobs done, parent RSS MB)
    while parent.poll() is None:
        rss = _rss_mb(parent.pid)
        if rss is not None:
            samples.append((time.monotonic() - started, len(list(root.glob("soak/*/results.json"))), rss))
        time.sleep(0.5)
    stdout, stderr = parent.communicate()
    wall = time.monotonic() - started
    assert parent.returncode == 0, stderr[-4000:]

    runs = TrackingStore.at(store).search_runs(TrackingStore.at(store).ensure_experiment("smoke"))
    children = [r for r in runs if r["tags"].get("robustcnn.sweep") != "true"]
    assert len(children) == JOBS and {r["status"] for r in children} == {"FINISHED"}
    assert sorted(int(r["tags"]["robustcnn.job_num"]) for r in children) == list(range(JOBS))
    results = [json.loads(p.read_text()) for p in root.glob("soak/*/results.json")]
    assert sorted(r["mlflow_run_id"] for r in results) == sorted(r["run_id"] for r in children)

    # while the jobs run (from the 10th result to the last): what grows per job; the sweep's end
    # (summary, dashboard: plotly and the store read once) is a fixed cost reported on its own
    during = [rss for _, done, rss in samples if 10 <= done < JOBS]
    assert during, "the sampler missed the sweep"
    growth = max(during) - during[0]
    figures = {
        "jobs": JOBS,
        "workers": 2,
        "wall_seconds": round(wall, 1),
        "seconds_per_job": round(wall / JOBS, 2),
        "parent_rss_mb_after_10_jobs": round(during[0], 1),
        "parent_rss_mb_before_the_last_job": round(during[-1], 1),
        "parent_growth_mb_during_jobs": round(growth, 1),
        "parent_growth_mb_per_job": round(growth / (JOBS - 10), 3),
        "parent_rss_mb_peak_with_report": round(max(rss for _, _, rss in samples), 1),
    }
    print(json.dumps(figures))
    if os.environ.get("ROBUSTCNN_SOAK_REPORT"):
        Path(os.environ["ROBUSTCNN_SOAK_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")
    assert growth < MAX_GROWTH_MB, figures
