"""The perceptually-aligned-gradients view (Tsipras et al. 2019): each defense's input gradient on the
same images, one row per run.

Why: Tsipras et al. found that an adversarially trained model's input gradients look like the object
(a digit's strokes), while a standard model's look like noise; laid out per defense on the same
images, that difference (or its absence: does a regulariser buy the same alignment?) is read at a
glance. Each classifier job keeps, beside its attribution grid, the signed input gradient of the true
class's score on its kept clean examples as data (:data:`GRADIENTS_FILE`, float16 safetensors: a
format that runs no code on load); the dashboard draws the grid across the experiment's runs.

Only runs whose kept images are the same are drawn side by side (a sweep over defenses on one data
set and seed keeps the same first images); a run that kept other images is named, not drawn.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from robustcnn.errors import ReportError
from robustcnn.report.examples import read_tensors, write_tensors
from robustcnn.report.figures import Row, draw_rows, stretched
from robustcnn.report.records import RunRecord

__all__ = ["GRADIENTS_FILE", "AlignedGrid", "GradientSet", "aligned_grid"]

#: The file (and MLflow artifact under ``plots/``) holding a run's kept images and their input gradients.
GRADIENTS_FILE = "gradients.safetensors"
_FORMAT = "robustcnn.gradients/1"
#: Pixels of one cell: a 28 px digit drawn 2x, so a dozen defenses fit one screen.
CELL_PIXELS = 56


@dataclass(frozen=True)
class GradientSet:
    """Clean images [k, C, H, W] in [0, 1], their labels [k] and the signed input gradient of the true
    class's score at each image [k, C, H, W]."""

    images: Tensor
    labels: Tensor
    gradients: Tensor

    def __post_init__(self) -> None:
        k = self.images.shape[0]
        if self.images.ndim != 4 or self.gradients.shape != self.images.shape or self.labels.shape != (k,):
            raise ReportError(
                f"gradients {tuple(self.gradients.shape)} and labels {tuple(self.labels.shape)} do not fit "
                f"the images {tuple(self.images.shape)} ([k, C, H, W], [k, C, H, W], [k])"
            )

    def save(self, path: Path) -> Path:
        """Write atomically; returns ``path``."""
        tensors = {"images": self.images, "labels": self.labels.long(), "gradients": self.gradients}
        return write_tensors(path, tensors, _FORMAT, {})

    @classmethod
    def load(cls, path: Path) -> GradientSet:
        """Read a file written by :meth:`save`; anything else is a :class:`ReportError`."""
        tensors, _ = read_tensors(path, _FORMAT, "gradients")
        missing = {"images", "labels", "gradients"} - set(tensors)
        if missing:
            raise ReportError(f"the gradients file {path} lacks {sorted(missing)}")
        return cls(tensors["images"].float(), tensors["labels"].long(), tensors["gradients"].float())


@dataclass(frozen=True)
class AlignedGrid:
    """The drawn grid (PNG bytes), the row of each run drawn, and the runs left out (other images)."""

    png: bytes
    rows: list[str]
    left_out: list[str]


def _row_label(run: RunRecord, with_model: bool) -> str:
    return f"{run.defense or '–'}\n{run.model}" if with_model else str(run.defense or "–")


def _largest_group(kept: Sequence[tuple[RunRecord, GradientSet]]) -> list[tuple[RunRecord, GradientSet]]:
    """The runs that kept the images most runs kept (the first run's on a tie)."""
    groups: list[list[tuple[RunRecord, GradientSet]]] = []
    for run, found in kept:
        for group in groups:
            reference = group[0][1].images
            if reference.shape == found.images.shape and torch.equal(reference, found.images):
                group.append((run, found))
                break
        else:
            groups.append([(run, found)])
    return max(groups, key=len)


def aligned_grid(runs: Sequence[RunRecord]) -> AlignedGrid | None:
    """The images, then per run its input gradients on them (stretched around grey: grey = 0).

    None when no run kept gradients. Rows are sorted by defense, then model; a row names the model
    too when the drawn runs differ in it (a sweep over ``model.pooling``).
    """
    kept = [(run, run.gradients) for run in runs if run.gradients is not None]
    if not kept:
        return None
    drawn = sorted(_largest_group(kept), key=lambda pair: (str(pair[0].defense or "–"), pair[0].model))
    first = drawn[0][1]
    with_model = len({run.model for run, _ in drawn}) > 1
    labels = first.labels.tolist()
    images = [(img.numpy(), f"label {y}", "black") for img, y in zip(first.images, labels, strict=True)]
    rows: list[Row] = [("image", images)]
    for run, found in drawn:
        cells = []
        for gradient in found.gradients:
            scaled, peak = stretched(gradient.numpy())
            cells.append((scaled, f"max {peak:.2g}", "black"))
        rows.append((_row_label(run, with_model), cells))
    with tempfile.TemporaryDirectory(prefix="robustcnn-aligned-") as tmp:
        path = draw_rows(rows, Path(tmp) / "aligned.png", len(labels), breaks=frozenset({1}),
                         cell_pixels=CELL_PIXELS)  # fmt: skip
        png = path.read_bytes()
    shown = {id(run) for run, _ in drawn}
    return AlignedGrid(
        png,
        [_row_label(run, with_model).replace("\n", " ") for run, _ in drawn],
        [run.label for run, _ in kept if id(run) not in shown],
    )
