"""The model zoo: small CNNs for MNIST/CIFAR-sized images, wrapped in :class:`Classifier`.

Every model takes raw images in [0, 1] and owns its normalization, so attacks never see
normalized tensors. Build one with :func:`build_model`; add your own with
:func:`register_model`.
"""

from __future__ import annotations

# Importing the zoo modules registers their builders.
from robustcnn.models import lenet, madry, mobilenet, resnet, vgg  # noqa: F401
from robustcnn.models.classifier import Classifier, count_parameters
from robustcnn.models.dropout import InferenceDropout, set_inference_dropout
from robustcnn.models.registry import available_models, build_model, model_label, register_model

__all__ = [
    "Classifier",
    "InferenceDropout",
    "available_models",
    "build_model",
    "count_parameters",
    "model_label",
    "register_model",
    "set_inference_dropout",
]
