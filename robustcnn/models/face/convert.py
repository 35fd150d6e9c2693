"""face-api's TF.js weights (manifest + .bin) -> our state dict -> safetensors.

Why a converter of our own instead of tfjs-converter: the format is simple (a JSON manifest listing
tensors in order, and one flat binary), and reading it in numpy keeps node/TF out of the Python side.
Most tensors are uint8-quantised (value = q * scale + min, computed in float64 and rounded to float32
as TF.js does); face-api's conv64_* filters are stored as raw float32, so the reader steps 1 or 4
bytes per value as each entry says. Everything is validated against the torch module (names, order,
shapes, byte count) so a different or damaged model fails with a clear AssetError, never silently.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any  # Any: a JSON manifest entry

import numpy as np
import torch

from robustcnn.errors import AssetError
from robustcnn.models.face.network import FaceApiResNet

MANIFEST_FILE = "face_recognition_model-weights_manifest.json"
#: Bytes per stored value for each storage dtype TF.js manifests use here.
_BYTES = {"float32": 4, "uint8": 1}


@functools.lru_cache(maxsize=1)
def manifest_layout() -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """(manifest name, state-dict key, TF.js shape) of every tensor, in the manifest's order.

    Derived from the torch module itself so the converter and the network cannot drift apart
    (computed once: building the module costs ~0.1 s).
    """
    layout = []
    for key, tensor in FaceApiResNet().state_dict().items():
        parts = key.split(".")
        if key == "fc.weight":
            layout.append(("fc", key, (tensor.shape[1], tensor.shape[0])))
            continue
        *prefix, module, leaf = parts
        if module == "conv":
            name = "filters" if leaf == "weight" else "bias"
            shape = (
                tuple(tensor.shape[2:]) + (tensor.shape[1], tensor.shape[0])
                if leaf == "weight"
                else tuple(tensor.shape)
            )
        else:  # scale
            name = "weights" if leaf == "weight" else "biases"
            shape = tuple(tensor.shape)
        layout.append(("/".join([*prefix, module, name]), key, shape))
    return tuple(layout)


def _entry_bytes(entry: dict[str, Any]) -> tuple[int, str]:
    """(byte size, storage dtype) of one manifest entry; unknown dtypes are refused."""
    quant = entry.get("quantization")
    dtype = quant.get("dtype") if quant else entry.get("dtype")
    if entry.get("dtype") != "float32" or dtype not in _BYTES:
        raise AssetError(
            f"face-api manifest entry {entry.get('name')!r} has dtype {entry.get('dtype')!r} "
            f"(stored as {dtype!r}); only float32 stored raw or as uint8 is supported"
        )
    return math.prod(entry["shape"]) * _BYTES[dtype], dtype


def read_tfjs_weights(model_dir: str | Path, manifest_name: str = MANIFEST_FILE) -> dict[str, np.ndarray]:
    """The manifest's tensors as float32 arrays in TF.js layout, validated against the network.

    Raises AssetError when the manifest is unreadable, lists other tensors or shapes, or the binary
    shards do not hold exactly the bytes the manifest describes.
    """
    model_dir = Path(model_dir)
    manifest_path = model_dir / manifest_name
    try:
        groups = json.loads(manifest_path.read_text())
        entries = [entry for group in groups for entry in group["weights"]]
        shard_names = [name for group in groups for name in group["paths"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(
            f"cannot read the face-api manifest {manifest_path} ({exc}); fetch the assets again"
        ) from exc
    layout = manifest_layout()
    if len(entries) != len(layout):
        raise AssetError(
            f"{manifest_path} lists {len(entries)} tensors, face-api 1.7.15's recognizer has {len(layout)}: "
            "this is not the face_recognition model of @vladmandic/face-api@1.7.15"
        )
    sizes = []
    for entry, (name, _, shape) in zip(entries, layout, strict=True):
        if entry.get("name") != name or tuple(entry.get("shape", ())) != shape:
            raise AssetError(
                f"{manifest_path}: expected tensor {name} {list(shape)}, found {entry.get('name')} "
                f"{entry.get('shape')}: not face-api 1.7.15's recognizer"
            )
        sizes.append(_entry_bytes(entry))
    shard_paths = [model_dir / name for name in shard_names]
    missing = [str(p) for p in shard_paths if not p.is_file()]
    if missing:
        raise AssetError(f"face-api weight file(s) {', '.join(missing)} missing; fetch the assets again")
    expected = sum(size for size, _ in sizes)
    actual = sum(p.stat().st_size for p in shard_paths)
    if actual != expected:
        raise AssetError(
            f"face-api weights {', '.join(shard_names)} hold {actual} bytes, the manifest describes "
            f"{expected} (truncated or damaged download); run `robustcnn assets --force`"
        )
    data = b"".join(p.read_bytes() for p in shard_paths)
    weights, offset = {}, 0
    for entry, (size, dtype) in zip(entries, sizes, strict=True):
        chunk = data[offset : offset + size]
        offset += size
        if dtype == "uint8":
            quant = entry["quantization"]
            q = np.frombuffer(chunk, dtype=np.uint8).astype(np.float64)
            values = (q * float(quant["scale"]) + float(quant["min"])).astype(np.float32)
        else:
            values = np.frombuffer(chunk, dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all():
            raise AssetError(f"face-api tensor {entry['name']} holds non-finite values (damaged weights)")
        weights[entry["name"]] = values.reshape(entry["shape"])
    return weights


def to_state_dict(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """TF.js-layout arrays -> FaceApiResNet's state dict (filters HWIO -> OIHW, fc [in, out] -> [out, in])."""
    state = {}
    for name, key, _ in manifest_layout():
        array = weights[name]
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        elif array.ndim == 2:
            array = array.T
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return state


def convert_face_api(
    model_dir: str | Path, out_path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Convert face-api's recognizer in ``model_dir`` to safetensors at ``out_path`` (+ a .sha256 sidecar).

    ``metadata`` (e.g. the package name, version and tarball sha256) is stored in the file's header so
    the weights say where they came from.
    """
    from safetensors.torch import save_file

    from robustcnn.hashing import file_sha256

    state = to_state_dict(read_tfjs_weights(model_dir))
    FaceApiResNet().load_state_dict(state, strict=True)  # shapes must fit the module (a bug guard)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "arch": "face_api_resnet", "source_license": "MIT", **(metadata or {})}
    save_file(state, str(out_path), metadata=meta)
    out_path.chmod(0o644)  # safetensors writes 0600; the assets folder is meant to be shared read-only
    out_path.with_name(out_path.name + ".sha256").write_text(f"{file_sha256(out_path)}  {out_path.name}\n")
    return out_path
