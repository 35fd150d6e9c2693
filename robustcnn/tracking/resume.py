"""Skip a job whose identical configuration already finished: resume and dedupe for sweeps.

Why by a key over the resolved config and the code version, looked up in the tracking store:
the store is where finished results live, so a re-run sweep (or the same job run again) finds
them wherever it runs, and only cells that never finished are computed again. Runs left RUNNING
by a killed process are marked KILLED first, so they never count as finished.
"""

from __future__ import annotations

import logging
from typing import Any

from robustcnn.tracking.store import TrackingStore

log = logging.getLogger(__name__)

#: The tag that carries a run's job key.
JOB_KEY_TAG = "robustcnn.job_key"


def find_finished(store: TrackingStore, experiment_id: str, key: str) -> dict[str, Any] | None:
    """The results of the newest FINISHED run with this job key, or None.

    A finished run whose ``results.json`` cannot be read (deleted artifacts) does not count:
    the job is computed again rather than reported without results.
    """
    query = f"tags.`{JOB_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
    runs = store.search_runs(experiment_id, query)
    for run in sorted(runs, key=lambda r: r["start_time"] or 0, reverse=True):
        try:
            results = store.download_json(run["run_id"], "results.json")
        except Exception as exc:  # missing or unreadable artifact: not reusable
            log.warning(
                "run %s finished but its results.json is unreadable (%s); not reused", run["run_id"], exc
            )
            continue
        results["reused_from"] = run["run_id"]
        return results
    return None
