"""One exception hierarchy for every failure a user can cause or fix.

The CLI catches :class:`RobustCNNError` and prints its message as one line with a
non-zero exit code, so every message must name the problem *and* the fix.
"""

from __future__ import annotations


class RobustCNNError(Exception):
    """Base class: a problem the user can act on (bad input, missing file, ...)."""

    exit_code: int = 2


class ConfigError(RobustCNNError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(RobustCNNError):
    """A dataset is missing, malformed or unknown."""


class ModelError(RobustCNNError):
    """A model is unknown, cannot be built, or a model file cannot be loaded safely."""


class CacheError(RobustCNNError):
    """The weight cache directory cannot be used."""


class TrackingError(RobustCNNError):
    """The MLflow tracking store cannot be reached or written."""


class ReportError(RobustCNNError):
    """A dashboard cannot be built: the store or the experiment does not exist, or has no runs."""


class AssetError(RobustCNNError):
    """A pretrained asset (face-recognition weights, sample photos) is missing or does not verify."""
