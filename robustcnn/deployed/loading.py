"""Load an untrusted model file safely, whatever its format (see formats.py for the detection).

Safety rules (a model file is untrusted input; README, "Auditing a deployed model"): state dicts are
read with ``torch.load(weights_only=True)`` or safetensors; a pickled full model is refused unless the user
sets ``audit.allow_pickle=true`` (documented as dangerous: unpickling runs the file's code);
TorchScript, torch.export and ONNX files go through their own loaders, which do not unpickle
arbitrary Python objects.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from robustcnn.deployed import formats
from robustcnn.deployed.onnx_torch import OnnxModule, UnsupportedOnnx
from robustcnn.errors import ModelError
from robustcnn.hashing import file_sha256

log = logging.getLogger(__name__)

#: Checkpoint layouts that wrap the state dict one level down ({"state_dict": {...}}, ...).
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "weights")


@dataclass
class LoadedModel:
    """A model file turned into something callable, plus what the report says about it."""

    path: Path
    format: str
    sha256: str
    #: images -> logits; for a weights file with an arch this is already a Classifier
    module: nn.Module | None
    #: the onnxruntime twin of an ONNX model (always present for ONNX: the black-box fallback)
    runtime: nn.Module | None = None
    #: a state dict waiting for its architecture (model.arch)
    state_dict: dict[str, Tensor] | None = None
    #: architecture named inside the file (safetensors metadata) or by the weight-cache sidecar
    arch_hint: str | None = None
    declared_input_shape: tuple[int | None, ...] | None = None
    notes: list[str] = field(default_factory=list)


class OnnxRuntimeModel(nn.Module):
    """Black-box access to an ONNX model through onnxruntime: logits, no gradients.

    Inputs leave the device for onnxruntime (unavoidable for a black box); a fixed batch size in
    the graph is honoured by running the batch in chunks of that size.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        batch = first.shape[0] if first.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.fixed_batch or max(1, array.shape[0])
        outputs = [
            torch.from_numpy(self.session.run(None, {self.input_name: array[i : i + step]})[0])
            for i in range(0, array.shape[0], step)
        ]
        return torch.cat(outputs).to(x.device)


class ExportedProgramModel(nn.Module):
    """A torch.export program's module: its train/eval mode was fixed when it was exported.

    ``ExportedProgram.module()`` refuses ``.train()``/``.eval()``; the audit (and every attack) sets
    eval mode on the whole model, so this wrapper records the flag without passing it down.
    """

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedProgramModel:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


def _refuse_pickle(path: Path, reason: str) -> ModelError:
    return ModelError(
        f"{path} is a pickled Python object, not plain weights, and was not loaded: unpickling it would "
        f"run code from the file ({reason}). Save the model as TorchScript (torch.jit.save), ONNX, or a "
        "state dict (torch.save(model.state_dict()) or safetensors) with model.arch=NAME; only if you "
        "trust the file completely, pass audit.allow_pickle=true"
    )


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise ModelError(
        f"{path} holds a {type(obj).__name__}, not a state dict of tensors; save "
        "model.state_dict() (or export TorchScript/ONNX) and audit that file"
    )


def _load_torch_save(path: Path, allow_pickle: bool) -> LoadedModel:
    sha = file_sha256(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in reason.lower() or "eof" in reason.lower():
            raise ModelError(f"{path} is truncated or damaged ({reason}); save the model again") from exc
        if not allow_pickle:
            raise _refuse_pickle(path, reason) from exc
        log.warning("audit.allow_pickle=true: unpickling %s runs its code", path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - whatever the pickle raises, say so in one line
            raise ModelError(f"{path} could not be unpickled ({type(exc2).__name__}: {exc2})") from exc2
        if isinstance(obj, nn.Module):
            return LoadedModel(
                path, "pickled_module", sha, obj, notes=["loaded with audit.allow_pickle=true"]
            )
    return LoadedModel(path, "state_dict", sha, None, state_dict=_unwrap_state_dict(obj, path))


def _load_safetensors(path: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = formats.safetensors_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is a damaged safetensors file ({exc}); save the weights again") from exc
    hint = meta.get("robustcnn.model") or meta.get("arch")
    return LoadedModel(path, "safetensors", file_sha256(path), None, state_dict=state, arch_hint=hint)


def _load_torchscript(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; deployed models still use it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path} is not a loadable TorchScript file ({first}); save it with torch.jit.save"
        ) from exc
    return LoadedModel(path, formats.TORCHSCRIPT, file_sha256(path), module)


def _load_exported_program(path: Path) -> LoadedModel:
    try:
        module = ExportedProgramModel(torch.export.load(str(path)).module())
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; one line for all
        raise ModelError(
            f"{path} is not a loadable torch.export program ({type(exc).__name__}: {exc})"
        ) from exc
    return LoadedModel(path, formats.EXPORTED_PROGRAM, file_sha256(path), module)


def _load_onnx(path: Path, mode: str) -> LoadedModel:
    import onnx

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - protobuf/checker errors have many types
        raise ModelError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc}); export it again"
        ) from exc
    init_names = {t.name for t in proto.graph.initializer}
    first = next(i for i in proto.graph.input if i.name not in init_names)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in first.type.tensor_type.shape.dim)
    loaded = LoadedModel(path, formats.ONNX, file_sha256(path), None, declared_input_shape=dims)
    try:
        loaded.runtime = OnnxRuntimeModel(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime errors are not a public hierarchy
        raise ModelError(f"onnxruntime cannot run {path} ({type(exc).__name__}: {exc})") from exc
    if mode == "black_box":
        loaded.notes.append("audit.onnx=black_box: attacked through onnxruntime without gradients")
        return loaded
    try:
        loaded.module = OnnxModule(proto)
    except UnsupportedOnnx as exc:
        if mode == "white_box":
            raise ModelError(
                f"{path} cannot be converted to torch for white-box attacks: it uses {exc}; "
                "use audit.onnx=auto to audit it black-box through onnxruntime"
            ) from exc
        loaded.notes.append(f"ONNX -> torch conversion not possible ({exc}): black-box attacks only")
    return loaded


def sidecar_arch(path: Path) -> str | None:
    """The architecture recorded by robustcnn's weight cache next to one of its entries."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    model = meta.get("model") if isinstance(meta, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) else None


def load_model_file(path: Path, *, allow_pickle: bool = False, onnx_mode: str = "auto") -> LoadedModel:
    """Sniff and load ``path``; never runs code from the file unless ``allow_pickle``."""
    kind = formats.sniff(path)
    if kind == formats.TORCHSCRIPT:
        return _load_torchscript(path)
    if kind == formats.EXPORTED_PROGRAM:
        return _load_exported_program(path)
    if kind == formats.ONNX:
        return _load_onnx(path, onnx_mode)
    loaded = _load_safetensors(path) if kind == formats.SAFETENSORS else _load_torch_save(path, allow_pickle)
    if loaded.state_dict is not None and loaded.arch_hint is None:
        loaded.arch_hint = sidecar_arch(path)
    return loaded
