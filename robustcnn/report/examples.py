"""The adversarial examples a run keeps, as data: saved by the job, drawn by the report.

Why data and not a picture: drawing a grid costs a job ~0.3-0.5 s (matplotlib's import and a
render), which a sweep of many small jobs pays per cell, while only the dashboard shows it. The job
writes the few kept images (clean, and adversarial per eps) to ``examples.safetensors`` (a format
that runs no code on load, float16: these are for display) and the report draws the grid when it
first needs it (:func:`render_png`), then keeps the PNG in its own cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from robustcnn.errors import ReportError

#: The file (and MLflow artifact under ``plots/``) holding a run's kept examples.
EXAMPLES_FILE = "examples.safetensors"
_FORMAT = "robustcnn.examples/1"


def write_tensors(path: Path, tensors: dict[str, Tensor], file_format: str, metadata: dict[str, str]) -> Path:
    """Save ``tensors`` (floats as float16: these are for display) with their format, atomically."""
    from safetensors.torch import save_file

    stored = {
        name: t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype).contiguous()
        for name, t in tensors.items()
    }
    partial = path.with_name(f".{path.name}.tmp")
    save_file(stored, str(partial), metadata={"format": file_format, **metadata})
    partial.replace(path)
    return path


def read_tensors(path: Path, file_format: str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor and the metadata of a file :func:`write_tensors` wrote in ``file_format``.

    Anything else (another format, a damaged or missing file) is a :class:`ReportError`: a report
    never draws from a file it cannot vouch for.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != file_format:
                found = metadata.get("format")
                raise ReportError(f"{path} is not a robustcnn {what} file (format {found!r})")
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReportError(f"cannot read the {what} file {path} ({exc})") from exc


@dataclass(frozen=True)
class ExampleSet:
    """Clean images [k, C, H, W] and their adversarial versions [E, k, C, H, W], one block per eps."""

    clean: Tensor
    adversarial: Tensor
    eps: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    #: The attack that made them (not saved: the report does not show it).
    attack: str = ""

    def save(self, path: Path) -> Path:
        """Write atomically (a reader never sees half a file); returns ``path``."""
        metadata = {"eps": json.dumps(list(self.eps)), "class_names": json.dumps(list(self.class_names))}
        return write_tensors(path, {"clean": self.clean, "adversarial": self.adversarial}, _FORMAT, metadata)

    @classmethod
    def load(cls, path: Path) -> ExampleSet:
        """Read a file written by :meth:`save`; anything else is a :class:`ReportError`."""
        tensors, metadata = read_tensors(path, _FORMAT, "examples")
        try:
            return cls(
                clean=tensors["clean"].float(),
                adversarial=tensors["adversarial"].float(),
                eps=tuple(float(e) for e in json.loads(metadata["eps"])),
                class_names=tuple(str(n) for n in json.loads(metadata["class_names"])),
            )
        except (KeyError, ValueError) as exc:
            raise ReportError(f"cannot read the examples file {path} ({exc!r} missing or bad)") from exc

    def render_png(self, path: Path) -> Path:
        """The example grid (clean, adversarial and perturbation rows per eps) as a PNG at ``path``."""
        from robustcnn.report.figures import example_grid

        return example_grid(
            path, self.clean, self.adversarial, self.eps, class_names=self.class_names or None
        )
