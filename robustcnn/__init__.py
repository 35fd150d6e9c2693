"""robustcnn: robustness and adversarial-security toolkit for convolutional networks."""

from __future__ import annotations

__version__ = "0.1.0"

from robustcnn.errors import RobustCNNError

__all__ = ["RobustCNNError", "__version__"]
