"""Which kind of model file is this? Decided from the bytes, never by loading it.

Why sniff rather than trust the extension: a ``.pt`` file may be TorchScript (safe to load with
its own loader), a ``torch.save`` zip of weights (safe with ``weights_only``) or a pickled full
model (runs code when unpickled); only the archive's contents tell them apart. Sniffing reads zip
member names and a few header bytes; it executes nothing.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from robustcnn.errors import ModelError

TORCHSCRIPT = "torchscript"
ONNX = "onnx"
SAFETENSORS = "safetensors"
TORCH_SAVE = "torch_save"  # a torch.save file: weights (state dict) or a pickled full model
EXPORTED_PROGRAM = "exported_program"  # torch.export.save (.pt2)

#: What a user can hand to ``robustcnn audit`` (for the error message of an unknown file).
SUPPORTED = (
    "TorchScript (torch.jit.save), ONNX (.onnx), a safetensors or torch.save state dict with "
    "model.arch=NAME, a torch.export program (.pt2), or an MLflow model URI (runs:/..., models:/...)"
)


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(
            f"{path} is a damaged or truncated zip archive ({exc}); export the model again "
            "(torch.jit.save / torch.save(model.state_dict())) and pass the new file"
        ) from exc
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return TORCHSCRIPT
    if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
        return EXPORTED_PROGRAM
    if any(n.endswith("data.pkl") for n in names):
        return TORCH_SAVE
    raise ModelError(f"{path} is a zip archive but not a model file robustcnn knows; pass {SUPPORTED}")


def _looks_like_onnx(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not ONNX"
        return False
    return len(model.graph.node) > 0


def sniff(path: Path) -> str:
    """The format of the model file at ``path`` (one of the constants above)."""
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; pass the path of a saved model ({SUPPORTED})")
    if path.is_dir():
        raise ModelError(f"{path} is a folder; pass the model file inside it, or an MLflow model URI")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"model file {path} is empty (0 bytes); save the model again and pass the new file")
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path)
    if _is_safetensors(head, size):
        return SAFETENSORS
    if head[:1] == b"\x80" or path.suffix in (".pkl", ".pickle"):
        return TORCH_SAVE  # a legacy (non-zip) torch.save or a bare pickle: weights_only decides
    if path.suffix == ".onnx" or _looks_like_onnx(path):
        return ONNX
    raise ModelError(f"{path} is not a model file robustcnn can read; pass {SUPPORTED}")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form ``__metadata__`` of a safetensors header (JSON; no tensor is read)."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        try:
            header = json.loads(handle.read(header_len))
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: damaged safetensors header ({exc}); save the weights again") from exc
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
