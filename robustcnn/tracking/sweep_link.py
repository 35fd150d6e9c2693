"""How a job finds the sweep it belongs to: the store, the experiment and the parent run.

Why in tracking: it is the tracking side of a sweep. The sweep's own process (robustcnn.sweeps)
creates the parent run and publishes it through the environment (inherited by joblib, submitit and
Ray workers) and a marker file in the sweep folder (for workers on other machines); jobs read it here,
so they never import the sweep machinery.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV_PARENT_RUN = "ROBUSTCNN_SWEEP_RUN_ID"
ENV_EXPERIMENT_ID = "ROBUSTCNN_SWEEP_EXPERIMENT_ID"
MARKER_FILE = ".robustcnn_sweep.json"


@dataclass(frozen=True)
class SweepLink:
    """What a job needs to log under its sweep: the store, the experiment and the parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    @classmethod
    def find(cls, sweep_dir: str | Path | None) -> SweepLink | None:
        """The sweep this process's job belongs to (environment first, then the marker file)."""
        run_id, experiment_id = os.environ.get(ENV_PARENT_RUN), os.environ.get(ENV_EXPERIMENT_ID)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if run_id and experiment_id and uri:
            return cls(uri, experiment_id, run_id)
        if sweep_dir is not None and (Path(sweep_dir) / MARKER_FILE).is_file():
            return cls(**json.loads((Path(sweep_dir) / MARKER_FILE).read_text()))
        return None

