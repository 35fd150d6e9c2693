"""From a loaded model file to the one model type the battery attacks, validated on the data.

Validation happens here, before any attack: the input shape the model declares or accepts against
the data's, the output against the number of classes, non-finite outputs, and for a converted ONNX
model agreement with onnxruntime. Each failure is a :class:`ModelError` that names both sides and
the fix (exit code 2), not a shape error from deep inside an attack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustcnn.data import DatasetInfo
from robustcnn.deployed.loading import LoadedModel
from robustcnn.errors import ConfigError, ModelError
from robustcnn.models import Classifier, available_models, build_model

#: Largest |logit difference| (relative to the logit scale) accepted between the torch conversion
#: of an ONNX model and onnxruntime; beyond it the conversion is not trusted (black-box instead).
ONNX_AGREEMENT = 1e-3


@dataclass
class PreparedModel:
    model: Classifier
    white_box: bool
    arch: str | None
    normalization: dict[str, list[float]] | None
    parameters: int
    notes: list[str]


def resolve_normalization(
    setting: object, info: DatasetInfo, default_dataset: bool
) -> dict[str, list[float]] | None:
    """``audit.normalization`` -> {mean, std} or None (raw [0, 1] pixels)."""
    if setting is None:
        setting = "dataset" if default_dataset else "none"
    if isinstance(setting, str):
        if setting == "none":
            return None
        if setting == "dataset":
            return {"mean": list(info.mean), "std": list(info.std)}
        raise ConfigError(
            f"audit.normalization={setting!r} is unknown; use none, dataset, or "
            "'{mean: [0.5], std: [0.25]}' (one value per channel)"
        )
    if isinstance(setting, Mapping) and set(setting) == {"mean", "std"}:
        mean, std = setting["mean"], setting["std"]
        mean = [mean] if isinstance(mean, (int, float)) else list(mean)
        std = [std] if isinstance(std, (int, float)) else list(std)
        return {"mean": mean, "std": std}
    raise ConfigError(
        f"audit.normalization={setting!r} must be none, dataset or a mapping with mean and std; "
        "e.g. audit.normalization='{mean: [0.1307], std: [0.3081]}'"
    )


def _build_from_state_dict(
    loaded: LoadedModel, arch: str | None, options: Mapping[str, Any], info: DatasetInfo, norm: dict | None
) -> Classifier:
    if not arch:
        raise ModelError(
            f"{loaded.path} holds only weights (a state dict) and no architecture; name it with "
            f"model.arch=NAME, one of: {', '.join(available_models())}"
        )
    mean = norm["mean"] if norm else [0.0] * info.input_shape[0]
    std = norm["std"] if norm else [1.0] * info.input_shape[0]
    model = build_model(
        arch, input_shape=info.input_shape, num_classes=info.num_classes, mean=mean, std=std, **dict(options)
    )
    state = dict(loaded.state_dict or {})
    if state and not all(k.startswith("net.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}  # a bare network's state dict
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shapes = [
        f"{k} {list(v.shape)} vs {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if missing or unexpected or bad_shapes:
        raise ModelError(
            f"the weights in {loaded.path} do not fit model.arch={arch} for {info.name} "
            f"({info.input_shape}, {info.num_classes} classes): missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatches {bad_shapes[:2]}; "
            "check model.arch (and model.options) and data"
        )
    model.load_state_dict(state, strict=True)
    return model


def _probe_forward(module: nn.Module, x: Tensor, what: str, info: DatasetInfo) -> Tensor:
    shape = [int(v) for v in x.shape]
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted model, in one line
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"the {what} failed on a batch of {info.name} images shaped {shape} ({first}); audit it on "
            "the data it was trained for (data=...), or set audit.normalization if it expects other inputs"
        ) from exc
    if not isinstance(out, Tensor):
        raise ModelError(f"the {what} returned {type(out).__name__}, not a tensor of logits")
    if out.dim() != 2 or out.shape[0] != shape[0] or out.shape[1] != info.num_classes:
        raise ModelError(
            f"the {what} returned shape {list(out.shape)} for {shape[0]} images, but {info.name} has "
            f"{info.num_classes} classes (expected [{shape[0]}, {info.num_classes}]); audit it with its "
            "own dataset (data=...)"
        )
    if not torch.isfinite(out).all():
        raise ModelError(
            f"the {what} returned non-finite logits (NaN/inf) on {info.name} images; check the model "
            "and audit.normalization"
        )
    return out


def _check_declared_shape(declared: Sequence[int | None] | None, info: DatasetInfo, path: Path) -> None:
    if not declared:
        return
    expected = (None, *info.input_shape)
    if len(declared) != 4 or any(
        d is not None and d != e for d, e in zip(declared[1:], expected[1:], strict=True)
    ):
        shown = ["N" if d is None else d for d in declared]
        raise ModelError(
            f"{path} expects inputs shaped {shown} but {info.name} images are "
            f"[N, {', '.join(map(str, info.input_shape))}]; "
            "audit it on matching data (data=...)"
        )


def prepare(
    loaded: LoadedModel,
    info: DatasetInfo,
    probe: Tensor,
    *,
    arch: str | None,
    options: Mapping[str, Any],
    normalization: object,
) -> PreparedModel:
    """Wrap, validate and (for ONNX) choose white- or black-box; ``probe`` = a few test images."""
    notes = list(loaded.notes)
    if loaded.state_dict is not None:
        arch = arch or loaded.arch_hint
        norm = resolve_normalization(normalization, info, default_dataset=True)
        model = _build_from_state_dict(loaded, arch, options, info, norm)
        _probe_forward(model, probe, f"model {arch}", info)
        params = sum(p.numel() for p in model.parameters())
        return PreparedModel(model.eval(), True, arch, norm, params, notes)

    norm = resolve_normalization(normalization, info, default_dataset=False)
    mean = norm["mean"] if norm else [0.0] * info.input_shape[0]
    std = norm["std"] if norm else [1.0] * info.input_shape[0]

    def wrap(net: nn.Module) -> Classifier:
        return Classifier(
            net,
            mean=mean,
            std=std,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            name=loaded.format,
        ).eval()

    _check_declared_shape(loaded.declared_input_shape, info, loaded.path)
    white_box = loaded.module is not None
    net = loaded.module if loaded.module is not None else loaded.runtime
    assert net is not None
    model = wrap(net)
    out = _probe_forward(model.net, (probe - model.mean) / model.std, f"{loaded.format} model", info)
    if loaded.module is not None and loaded.runtime is not None:
        reference = _probe_forward(
            loaded.runtime, (probe - model.mean) / model.std, "onnxruntime session", info
        )
        gap = float((out - reference).abs().max() / reference.abs().max().clamp_min(1.0))
        if gap > ONNX_AGREEMENT:
            notes.append(
                f"ONNX -> torch conversion disagrees with onnxruntime (relative gap {gap:.2e}): "
                "black-box only"
            )
            white_box = False
            model = wrap(loaded.runtime)
        else:
            notes.append(
                f"ONNX converted to torch for white-box attacks (agrees with onnxruntime to {gap:.1e})"
            )
    params = sum(p.numel() for p in net.parameters())
    if not white_box and loaded.runtime is not None:
        import onnx

        proto = onnx.load(str(loaded.path), load_external_data=False)
        params = sum(int(torch.tensor(list(t.dims)).prod()) if t.dims else 1 for t in proto.graph.initializer)
    return PreparedModel(model, white_box, None, norm, params, notes)
