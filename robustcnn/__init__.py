"""robustcnn: robustness and adversarial-security toolkit for convolutional networks.

The Python API (see README, "Python API"), without Hydra or MLflow::

    import robustcnn as rc

    data = rc.load_dataset("mnist5k")
    model = rc.build_model("lenet5", input_shape=data.info.input_shape, num_classes=10,
                           mean=data.info.mean, std=data.info.std)
    rc.fit(model, data.x_train, data.y_train, rc.TrainConfig(epochs=1))
    threat = rc.ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3))
    result = rc.evaluate(model, data.x_test[:200], data.y_test[:200], threat,
                         attacks=[rc.attacks.FGSM(), rc.attacks.APGD(steps=20)])
    result.worst_case_robust_accuracy(), result.verdict

Names are imported on first use (PEP 562), so ``import robustcnn`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from robustcnn.errors import RobustCNNError

#: Public name -> the module that defines it.
_LAZY = {
    "evaluate": "robustcnn.api",
    "audit": "robustcnn.api",
    "default_attacks": "robustcnn.api",
    "AuditSettings": "robustcnn.jobs.audit",
    "AuditOutcome": "robustcnn.jobs.audit",
    "ThreatModel": "robustcnn.threat",
    "Classifier": "robustcnn.models",
    "build_model": "robustcnn.models",
    "load_dataset": "robustcnn.data",
    "Dataset": "robustcnn.data",
    "TrainConfig": "robustcnn.training.loop",
    "fit": "robustcnn.training.loop",
    "BatteryResult": "robustcnn.evaluation.battery",
    "BatterySettings": "robustcnn.evaluation.battery",
}
_SUBMODULES = ("attacks",)

__all__ = ["RobustCNNError", "__version__", *_LAZY, *_SUBMODULES]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from robustcnn import attacks  # noqa: F401
    from robustcnn.api import audit, default_attacks, evaluate  # noqa: F401
    from robustcnn.data import Dataset, load_dataset  # noqa: F401
    from robustcnn.evaluation.battery import BatteryResult, BatterySettings  # noqa: F401
    from robustcnn.jobs.audit import AuditOutcome, AuditSettings  # noqa: F401
    from robustcnn.models import Classifier, build_model  # noqa: F401
    from robustcnn.threat import ThreatModel  # noqa: F401
    from robustcnn.training.loop import TrainConfig, fit  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"robustcnn.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'robustcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
