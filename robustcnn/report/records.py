"""What the dashboard knows about one MLflow run, and which section of the page a run belongs to.

Kept free of mlflow and plotly so that the rules (which runs count, which are skipped) and the
tables built from them can be tested on hand-made runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of this module: hand-made runs in tests need none
    from robustcnn.report.aligned import GradientSet

#: Tag set on a sweep's parent run (it holds a summary, not results).
SWEEP_TAG = "robustcnn.sweep"
#: Tag set on face-patch attack runs (issue 5); they get their own section.
FACE_PATCH_TAG = "robustcnn.face_patch"
#: The one image every job logs that the page embeds (the adversarial example grid).
EXAMPLES_PNG = "examples.png"
#: Face runs' images the page embeds (``face/adversarial_faces.png``, ``face/patches/<goal>/<name>.png``).
FACE_IMAGE_PREFIX = "face/"


def _is_true(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


@dataclass
class RunRecord:
    """One run as read from the store; ``results``/``config``/``images`` only for finished job runs."""

    run_id: str
    name: str
    status: str
    start_time: int | None = None  # milliseconds since the epoch, as MLflow stores it
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    #: The kept images' input gradients (:mod:`robustcnn.report.aligned`), when the run logged them.
    gradients: GradientSet | None = field(default=None, compare=False)

    @property
    def is_parent(self) -> bool:
        """A sweep's parent run: never a leaderboard row (its children are)."""
        return _is_true(self.tags.get(SWEEP_TAG))

    @property
    def is_face_patch(self) -> bool:
        """A face study's run (its task tag or results say so; older runs: the face-patch tag)."""
        return (
            _is_true(self.tags.get(FACE_PATCH_TAG))
            or self.tags.get("task") == "face_patch"
            or self.result("task") == "face_patch"
        )

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def needs_artifacts(self) -> bool:
        """Only finished job runs are worth downloading artifacts for."""
        return self.finished and not self.is_parent

    def result(self, key: str, default: Any = None) -> Any:
        return (self.results or {}).get(key, default)

    @property
    def defense(self) -> str | None:
        """The defense as chosen (preset and overrides, e.g. ``prune_robust``), else its type."""
        for value in (self.result("defense_label"), self.result("defense")):
            if value:
                return str(value)
        return self.tags.get("defense_label") or self.tags.get("defense")

    @property
    def model(self) -> str:
        """The model as run: its name and each option off its default (``lenet5 pooling=avg``)."""
        for value in (self.result("model_label"), self.result("model")):
            if value:
                return str(value)
        return self.tags.get("model_label") or self.tags.get("model") or ""

    @property
    def label(self) -> str:
        """A short human name: the run name, else model/defense/data, else the id."""
        if self.name:
            return self.name
        parts = [self.model, self.defense or ""]
        parts.append(str(self.result("data") or self.tags.get("data") or ""))
        return "-".join(p for p in parts if p) or self.run_id[:8]


@dataclass
class ExperimentRuns:
    """An experiment's runs, split into the page's sections."""

    name: str
    finished: list[RunRecord] = field(default_factory=list)
    face_patch: list[RunRecord] = field(default_factory=list)
    incomplete: list[RunRecord] = field(default_factory=list)
    skipped: int = 0  # sweep parents and finished runs without results.json


def split_runs(name: str, runs: Iterable[RunRecord]) -> ExperimentRuns:
    """Sort runs into sections: parents and runs without results are skipped, unfinished listed apart."""
    out = ExperimentRuns(name)
    for run in runs:
        if run.is_parent:
            out.skipped += 1
        elif not run.finished:
            out.incomplete.append(run)
        elif run.results is None:
            out.skipped += 1
        elif run.is_face_patch:
            out.face_patch.append(run)
        else:
            out.finished.append(run)
    return out
