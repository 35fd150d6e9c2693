"""Each job of a sweep composed once, not twice, when the jobs run in the sweep's own process.

Why: Hydra's sweeper composes every job's config to check the batch before launching it
(``Sweeper.validate_batch_is_legal``: a bad override fails before any job starts), then the basic
launcher composes the same config again to run it, ~0.3 s each. When both happen in this process
(``hydra/launcher=basic``, the default), the config the check composed is handed to the launch
instead of being thrown away. Parallel launchers compose in their workers; they are left alone.

The hand-over wraps ``Sweeper.validate_batch_is_legal`` (which keeps what it composes) and
``ConfigLoaderImpl.load_sweep_config`` (which takes it, once) of Hydra 1.3, which pyproject.toml pins.
If Hydra's internals ever move, :func:`compose_each_job_once` leaves Hydra as it is and the sweep
composes twice, as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Configs composed by the check and not yet taken by the launch, by the job's overrides.
_COMPOSED: dict[tuple[str, ...], Any] = {}


def compose_each_job_once() -> bool:
    """Install the hand-over (idempotent); False when Hydra's internals are not the expected ones."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.plugins.sweeper import Sweeper
    except ImportError:  # pragma: no cover - Hydra moved its internals
        return False
    load = getattr(ConfigLoaderImpl, "load_sweep_config", None)
    check = getattr(Sweeper, "validate_batch_is_legal", None)
    if load is None or check is None:  # pragma: no cover - Hydra moved its internals
        return False
    if getattr(load, "robustcnn_compose_once", False):
        return True
    # replacing methods of Hydra's classes is what mypy refuses by default: it is the point here
    Sweeper.validate_batch_is_legal = _keeping_checked(load)  # type: ignore[method-assign,assignment]
    ConfigLoaderImpl.load_sweep_config = _taking_checked(load)  # type: ignore[method-assign]
    return True


def _keeping_checked(compose: Callable[..., Any]) -> Callable[[Any, Sequence[Sequence[str]]], None]:
    """The sweeper's check: compose every job of the batch (errors surface here) and keep each config."""

    def validate_batch_is_legal(sweeper: Any, batch: Sequence[Sequence[str]]) -> None:
        loader = sweeper.hydra_context.config_loader
        for overrides in batch:
            _COMPOSED[tuple(overrides)] = compose(loader, sweeper.config, list(overrides))

    return validate_batch_is_legal


def _taking_checked(compose: Callable[..., Any]) -> Callable[..., Any]:
    """The launcher's compose: the config the check kept for these overrides, else a fresh one."""

    @functools.wraps(compose)
    def load_sweep_config(loader: Any, master_config: Any, sweep_overrides: Sequence[str]) -> Any:
        kept = _COMPOSED.pop(tuple(sweep_overrides), None)
        return kept if kept is not None else compose(loader, master_config, list(sweep_overrides))

    load_sweep_config.robustcnn_compose_once = True  # type: ignore[attr-defined]  # a marker on a function
    return load_sweep_config


def forget_composed() -> None:
    """Drop configs checked but never launched (a sweep that stopped early, or a parallel launcher)."""
    _COMPOSED.clear()
