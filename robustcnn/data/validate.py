"""Type checks for dataset options, so a wrong value is a :class:`ConfigError` that names the key.

Options usually come from YAML / the command line, where ``download=yes`` or ``image_size=32`` are
easy mistakes; failing early with the key name beats a ``TypeError`` from deep inside numpy or PIL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from robustcnn.errors import ConfigError


def check_bool(value: object, key: str) -> bool:
    """A real bool (YAML ``true``/``false``), not a string or an int."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"data.{key} must be true or false, got {value!r}")
    return bool(value)


def check_root(value: object, key: str = "root") -> Path:
    """A folder path given as str or os.PathLike (not yet required to exist)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"data.{key} must be a folder path, got {value!r}; set data.{key}=/path/to/folder")
    return Path(value).expanduser()


def check_int_choice(value: object, key: str, choices: Sequence[int]) -> int:
    """An int from ``choices``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in choices:
        raise ConfigError(f"data.{key} must be one of {list(choices)}, got {value!r}")
    return int(value)


def check_fraction(value: object, key: str) -> float:
    """A float strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"data.{key} must be a number strictly between 0 and 1, got {value!r}")
    if not 0 < float(value) < 1:
        raise ConfigError(f"data.{key} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and int(value) >= 1


def check_size(value: object, key: str) -> tuple[int, int]:
    """[H, W]: two positive ints (a list, tuple or OmegaConf ListConfig)."""
    try:
        items = list(value) if isinstance(value, Iterable) else []
    except TypeError:  # an iterable that cannot be iterated, e.g. a 0-d numpy array
        items = []
    if len(items) != 2 or not all(_positive_int(v) for v in items):
        raise ConfigError(f"data.{key} must be [height, width] with two positive integers, got {value!r}")
    return int(items[0]), int(items[1])
