"""Name -> loader registry, and the one entry point :func:`load_dataset`.

Why a registry: the config names a dataset by string (``data=mnist5k``), and a user can add a
source with one decorator. :func:`load_dataset` also owns what every dataset shares: checking the
options against the loader's signature (a typo is a :class:`ConfigError`, not a ``TypeError`` deep
inside), the ``max_train`` / ``max_test`` subsets and the identity fields that make a load
reproducible and cacheable.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from robustcnn.data.base import TRAIN_CONTENT, Dataset, short_sha256
from robustcnn.data.split import subset_indices
from robustcnn.errors import ConfigError, DataError

Loader = Callable[..., Dataset]

#: Options every dataset accepts; handled here, never passed to the loader.
COMMON_OPTIONS = ("max_train", "max_test")
#: Seed of the permutation that ``max_train`` / ``max_test`` take a prefix of (recorded in identity).
SUBSET_SEED = 0

_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make ``fn(**kwargs) -> Dataset`` loadable as ``load_dataset(name, **kwargs)``.

    The loader's keyword parameters are its options; ``max_train`` / ``max_test`` are added for free.
    """

    def decorator(fn: Loader) -> Loader:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ValueError(f"dataset name {name!r} is already registered by {_qualname(existing)}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_REGISTRY)


def load_dataset(name: str, **kwargs: object) -> Dataset:
    """Load dataset ``name`` with the loader's options plus ``max_train`` / ``max_test``.

    ``max_train`` / ``max_test`` (int or None) keep a deterministic, class-balanced subset: the first
    k of a fixed seeded round-robin permutation (see :func:`~robustcnn.data.split.stratified_order`),
    in the loader's order. mean/std stay those of the full train split.
    """
    loader = _REGISTRY.get(name)
    if loader is None:
        hint = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise DataError(
            f"unknown dataset {name!r}{did_you_mean}; valid names: "
            f"{', '.join(available_datasets())} (pick one with data=<name>)"
        )
    limits = {key: _check_limit(key, kwargs.pop(key, None)) for key in COMMON_OPTIONS}
    _check_options(name, loader, kwargs)
    dataset = loader(**kwargs)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset loader {_qualname(loader)} returned {type(dataset).__name__}, not Dataset")
    return _finalize(name, dataset, limits["max_train"], limits["max_test"])


def _qualname(fn: Callable[..., object]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_limit(key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"data.{key} must be a positive integer or null, got {value!r}")
    return int(value)


def _check_options(name: str, loader: Loader, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(loader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in params if p.kind in kinds]
    accepted = sorted({p.name for p in named} | set(COMMON_OPTIONS))
    for key in kwargs:
        if key not in accepted:
            hint = difflib.get_close_matches(key, accepted, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"dataset {name!r} has no option {key!r}{did_you_mean}; accepted options: "
                f"{', '.join(accepted)}"
            )
    missing = [p.name for p in named if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"dataset {name!r} needs {', '.join(missing)}; set it, e.g. data.{missing[0]}=...")


def _take(
    dataset: Dataset, split: str, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, bool]:
    x: torch.Tensor = getattr(dataset, f"x_{split}")
    y: torch.Tensor = getattr(dataset, f"y_{split}")
    if limit is None or limit >= len(y):
        return x, y, np.arange(len(y), dtype=np.int64), False
    keep = subset_indices(y.numpy(), limit, SUBSET_SEED)
    index = torch.from_numpy(keep)
    return x.index_select(0, index).contiguous(), y.index_select(0, index), keep, True


def _finalize(name: str, dataset: Dataset, max_train: int | None, max_test: int | None) -> Dataset:
    """Apply the subsets and complete the identity.

    Identity keys added here are prefixed ``train_`` / ``test_`` so a consumer can tell which
    split they describe (e.g. leave ``test_*`` out of a trained-weights cache key).
    ``test_sha256`` covers the test images' bytes, labels and subset indices (cheap, and it makes
    the identity self-verifying); ``train_labels_sha256`` covers the kept train labels and indices,
    and ``train_sha256`` the whole train split's content (hashed by
    :func:`~robustcnn.data.base.build_dataset` from the uint8 pixels, or here from the floats of a
    loader that built its :class:`Dataset` itself), so together they pin the train subset's pixels.
    """
    x_train, y_train, train_keep, train_cut = _take(dataset, "train", max_train)
    x_test, y_test, test_keep, test_cut = _take(dataset, "test", max_test)
    identity: dict[str, Any] = {"dataset": name, **dataset.info.identity}
    if TRAIN_CONTENT not in identity:
        identity[TRAIN_CONTENT] = short_sha256(dataset.x_train, dataset.y_train)
    identity["train_n"] = len(y_train)
    identity["test_n"] = len(y_test)
    if train_cut:
        identity["train_max"] = max_train
    if test_cut:
        identity["test_max"] = max_test
    if train_cut or test_cut:
        identity["subset_seed"] = SUBSET_SEED
    identity["train_labels_sha256"] = short_sha256(train_keep, y_train)
    identity["test_sha256"] = short_sha256(test_keep, y_test, x_test)
    info = dataclasses.replace(dataset.info, identity=identity)
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, info=info)
