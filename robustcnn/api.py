"""The Python API for notebooks and scripts: evaluate a model in memory, audit a model file.

Why a small surface of its own: ART, torchattacks and foolbox users work in Python, with tensors and
modules, not command lines. These functions run the same code as ``robustcnn run`` and
``robustcnn audit`` (the battery with its probes and sanity checks, the audit's loading, gate and
model card) and need neither Hydra nor an MLflow store: nothing is logged or written unless asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from robustcnn.attacks import APGD, FGSM, Attack, Square
from robustcnn.data import Dataset, load_dataset
from robustcnn.deployed import loading, sources
from robustcnn.device import resolve_device
from robustcnn.errors import ConfigError
from robustcnn.evaluation.battery import BatteryResult, BatterySettings, run_battery
from robustcnn.jobs.audit import AuditedModel, AuditOutcome, AuditSettings, audit_model
from robustcnn.threat import ThreatModel


def default_attacks(seed: int = 0) -> list[Attack]:
    """The audit's white-box defaults (conf/audit.yaml): FGSM, APGD (100 steps, margin loss) and Square
    (300 queries, giving up every 50 on samples it cannot move across the boundary).

    The battery adds the noise floor, EOT copies for a stochastic model (and PGD-EOT, whose fixed step
    a noisy loss does not stall) and the strength probes.
    """
    return [
        FGSM(seed=seed),
        APGD(steps=100, loss="margin", seed=seed),
        Square(queries=300, progress_window=50, seed=seed),
    ]


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attacks: Sequence[Attack] | None = None,
    *,
    undefended: bool = False,
    checks: BatterySettings | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> BatteryResult:
    """Attack ``model`` on images ``x`` (in [0, 1]) with labels ``y`` and judge the evaluation.

    ``model`` takes raw [0, 1] images and returns logits (a :class:`robustcnn.Classifier` owns its
    normalization). Returns the battery's result: per-attack and per-sample worst-case robust
    accuracy per eps (``worst_case_robust_accuracy()``), the sanity checks and the ``verdict``;
    ``to_dict()`` is the ``results.json`` schema. ``undefended=True`` adds the check that robust
    accuracy reaches ~0 at the largest eps (true of any undefended model).
    """
    chosen = resolve_device(device) if isinstance(device, str) else device
    return run_battery(
        model.to(chosen),
        x,
        y,
        threat,
        list(attacks) if attacks is not None else default_attacks(),
        undefended=undefended,
        settings=checks,
        device=chosen,
        progress=progress,
    )


def audit(
    model: str | Path | nn.Module,
    data: str | Dataset = "mnist5k",
    threat: ThreatModel | None = None,
    attacks: Sequence[Attack] | None = None,
    *,
    settings: AuditSettings | None = None,
    checks: BatterySettings | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> AuditOutcome:
    """Audit a model file (TorchScript, ONNX, torch.export, safetensors/state dict) or a module.

    The file is read as ``robustcnn audit`` reads it (never unpickled unless
    ``settings.allow_pickle``), validated against ``data``'s test split and attacked; the outcome
    holds ``results`` (audit.json's contents), ``verdict``, ``exit_code`` (0 passed, 1 below
    ``settings.min_robust_accuracy`` or refused on black-box evidence, 3 unreliable or unchecked)
    and the model ``card``. ``threat`` defaults to
    MNIST's L-inf radii up to 0.3; transfer attacks need a surrogate bound first (``.bind(model)``).
    """
    settings = settings or AuditSettings()
    dataset = load_dataset(data) if isinstance(data, str) else data
    threat = threat or ThreatModel(eps=(0.0, 0.1, 0.2, 0.3), reference_eps=0.3)
    threat.check_input_size(dataset.info.input_shape)
    chosen = resolve_device(device) if isinstance(device, str) else device
    return audit_model(
        audited(model, settings),
        dataset,
        threat,
        list(attacks) if attacks is not None else default_attacks(),
        settings,
        checks=checks,
        device=chosen,
        progress=progress,
    )


def audited(model: str | Path | nn.Module, settings: AuditSettings) -> AuditedModel:
    """A file read safely (by its bytes, not its name), or a module in memory, as the audit's input."""
    if isinstance(model, nn.Module):
        return AuditedModel(
            loading.LoadedModel(path=Path("<in memory>"), format="module", sha256="", module=model.eval()),
            source="<in memory>",
            name=type(model).__name__,
        )
    path = Path(model)
    if not path.is_file():
        raise ConfigError(f"{path} is not a model file; pass a TorchScript, ONNX or weights file or a module")
    loaded = loading.load_model_file(path, allow_pickle=settings.allow_pickle, onnx_mode=settings.onnx)
    return AuditedModel(loaded, str(path), sources.model_name(str(path)))
