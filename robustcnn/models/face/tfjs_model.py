"""Read a TF.js graph model (``model.json`` + weight shards) into its nodes and numpy weights.

Why our own reader: the format is a JSON graph (TensorFlow NodeDefs) plus a manifest listing each
weight's name, shape, dtype and optional quantisation, stored back to back in the shards; reading it
in numpy keeps node and TensorFlow out of the Python side. Float16 weights are widened to float32
(exactly, as TF.js does); uint8/uint16 ones are dequantised as ``q * scale + min`` (computed in
float64, rounded to float32). A manifest that describes other bytes than the shards hold, an unknown
dtype or a non-finite weight is refused with an AssetError naming the file.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any  # Any: JSON NodeDefs and attributes

import numpy as np

from robustcnn.errors import AssetError

#: numpy type of each stored dtype: plain tensors, then quantised ones.
_STORED = {"float32": "<f4", "int32": "<i4", "float16": "<f2", "uint8": "u1", "uint16": "<u2"}


@dataclass(frozen=True)
class GraphNode:
    """One NodeDef: its name, op, inputs (names without ``:0``; control inputs dropped), attributes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attr: dict[str, Any]

    def ints(self, key: str) -> list[int]:
        return [int(v) for v in self.attr.get(key, {}).get("list", {}).get("i", [])]

    def text(self, key: str) -> str:
        raw = self.attr.get(key, {}).get("s", "")
        return base64.b64decode(raw).decode() if raw else ""

    def texts(self, key: str) -> list[str]:
        return [base64.b64decode(s).decode() for s in self.attr.get(key, {}).get("list", {}).get("s", [])]

    def flag(self, key: str) -> bool:
        return bool(self.attr.get(key, {}).get("b", False))


@dataclass(frozen=True)
class GraphModel:
    """A TF.js graph model: nodes in file order, weights by node name, where it was read from."""

    nodes: tuple[GraphNode, ...]
    weights: dict[str, np.ndarray]
    path: Path


def _node(raw: dict[str, Any]) -> GraphNode:
    inputs = tuple(i.split(":")[0] for i in raw.get("input", []) if not i.startswith("^"))
    return GraphNode(str(raw["name"]), str(raw["op"]), inputs, dict(raw.get("attr", {})))


def _decode(entry: dict[str, Any], chunk: bytes) -> np.ndarray:
    """One manifest entry's bytes -> float32 or int32 array of its shape."""
    quant = entry.get("quantization")
    if quant:
        stored = np.frombuffer(chunk, dtype=_STORED[quant["dtype"]])
        if quant["dtype"] == "float16":
            values = stored.astype(np.float32)
        else:
            values = (stored.astype(np.float64) * float(quant["scale"]) + float(quant["min"])).astype(
                np.float32
            )
    else:
        values = np.frombuffer(chunk, dtype=_STORED[entry["dtype"]]).copy()
    return values.reshape(entry["shape"])


def _entry_size(entry: dict[str, Any], path: Path) -> int:
    quant = entry.get("quantization")
    stored = quant.get("dtype") if quant else entry.get("dtype")
    if entry.get("dtype") not in ("float32", "int32") or stored not in _STORED:
        raise AssetError(
            f"{path}: weight {entry.get('name')!r} has dtype {entry.get('dtype')!r} stored as {stored!r}; "
            "only float32/int32, raw or quantised to float16/uint8/uint16, are supported"
        )
    return math.prod(entry["shape"]) * np.dtype(_STORED[stored]).itemsize


def _read_weights(groups: list[dict[str, Any]], folder: Path, path: Path) -> dict[str, np.ndarray]:
    entries = [entry for group in groups for entry in group["weights"]]
    shards = [folder / name for group in groups for name in group["paths"]]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise AssetError(f"{path}: weight shard(s) {', '.join(missing)} missing; fetch the assets again")
    sizes = [_entry_size(entry, path) for entry in entries]
    data = b"".join(p.read_bytes() for p in shards)
    if len(data) != sum(sizes):
        raise AssetError(
            f"{path}: the shards hold {len(data)} bytes, the manifest describes {sum(sizes)} "
            "(truncated or damaged download); run `robustcnn assets --force`"
        )
    weights, offset = {}, 0
    for entry, size in zip(entries, sizes, strict=True):
        values = _decode(entry, data[offset : offset + size])
        offset += size
        if values.dtype == np.float32 and not np.isfinite(values).all():
            raise AssetError(f"{path}: weight {entry['name']} holds non-finite values (damaged weights)")
        weights[str(entry["name"])] = values
    return weights


def read_graph_model(path: str | Path) -> GraphModel:
    """The graph and weights of the TF.js graph model ``path`` (model.json; shards beside it)."""
    path = Path(path)
    try:
        model = json.loads(path.read_text())
        if model.get("format") != "graph-model":
            raise ValueError(f"format is {model.get('format')!r}, not 'graph-model'")
        nodes = tuple(_node(raw) for raw in model["modelTopology"]["node"])
        groups = list(model["weightsManifest"])
        weights = _read_weights(groups, path.parent, path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"cannot read the TF.js graph model {path} ({exc}); fetch the assets again") from exc
    return GraphModel(nodes, weights, path)
