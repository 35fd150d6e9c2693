"""Where the model comes from: a local file, or an MLflow model URI downloaded to a local folder.

An MLflow model is a folder (``MLmodel`` + the flavor's files); the file that holds the network is
found from the flavor (onnx, pytorch) and then loaded like any local file, under the same safety
rules: mlflow's own ``load_model`` is never called, because for the pytorch flavor it unpickles.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from robustcnn.errors import ModelError
from robustcnn.files import safe_file_name

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
#: Files that can hold a network, in the order an MLflow model folder is searched.
MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".ts", ".pt2", ".safetensors", ".bin", ".pkl")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def model_name(source: str) -> str:
    """A short, file-system-safe name for the report folder and the run name."""
    if source.startswith("models:/"):
        stem = source[len("models:/") :].replace("/", "-v", 1).replace("@", "-")
    elif source.startswith("runs:/"):
        parts = source[len("runs:/") :].split("/", 1)
        stem = f"run-{parts[0][:8]}" + (f"-{Path(parts[1]).name}" if len(parts) > 1 and parts[1] else "")
    else:
        stem = Path(source).stem or "model"
    return safe_file_name(stem, "model")


def model_file_in(folder: Path, source: str) -> Path:
    """The network file of an MLflow model folder (flavor first, else the only candidate)."""
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        try:
            flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
        except yaml.YAMLError as exc:
            raise ModelError(f"{source}: its MLmodel file is not valid YAML ({exc})") from exc
        onnx_data = (flavors.get("onnx") or {}).get("data")
        if onnx_data and (folder / onnx_data).is_file():
            return folder / onnx_data
        torch_data = (flavors.get("pytorch") or {}).get("model_data")
        if torch_data:
            folder = folder / torch_data
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(str(p.relative_to(folder)) for p in candidates) or "none"
    raise ModelError(
        f"{source} holds {len(candidates)} model files ({found}); point at one of them, "
        "e.g. runs:/<run id>/<artifact path>/<file>"
    )
