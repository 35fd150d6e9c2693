"""Attack registry and construction from config.

Config shape (the ``attack`` group, Hydra multiple selection): ``{backend: native, pgd: {...},
fgsm: {...}}``; every selected attack sits under its own key, and ``backend`` applies to every
attack that has one unless the attack sets its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from robustcnn.attacks.base import Attack
from robustcnn.errors import ConfigError

_REGISTRY: dict[str, Callable[..., Attack]] = {}
BACKENDS = ("native", "torchattacks", "art")


def register_attack(name: str) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    def decorate(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        if name in _REGISTRY:
            raise ValueError(f"attack {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_attacks() -> list[str]:
    return sorted(_REGISTRY)


def accepted_keys(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments a class (with its bases) accepts; None for a function taking **kwargs."""
    keys: set[str] = set()
    targets = inspect.getmro(factory) if inspect.isclass(factory) else (factory,)
    for target in targets:
        init = target.__dict__.get("__init__") if inspect.isclass(factory) else target
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            continue
        params = sig.parameters.values()
        if not inspect.isclass(factory) and any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        keys |= {
            p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        }
    return keys


def register_backend(name: str, backend: str) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    """Register the same attack run through another library (same settings, same meaning)."""

    def decorate(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        _BACKEND_REGISTRY[(name, backend)] = factory
        return factory

    return decorate


_BACKEND_REGISTRY: dict[tuple[str, str], Callable[..., Attack]] = {}


def build_attack(spec: Mapping[str, Any], common: Mapping[str, Any] | None = None) -> Attack:
    """Build one attack from its config node (``name``, ``backend``, settings).

    ``common`` holds job-wide settings (seed, batch size, amp) used where the attack accepts them
    and does not set them itself.
    """
    params = dict(spec)
    name = params.pop("name", None)
    backend = params.pop("backend", None) or "native"
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(available_attacks())}")
    if backend not in BACKENDS:
        raise ConfigError(f"attack.backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    factory = _REGISTRY[name]
    if backend != "native":
        if (name, backend) not in _BACKEND_REGISTRY:
            offered = sorted(b for (n, b) in _BACKEND_REGISTRY if n == name)
            raise ConfigError(
                f"attack {name} has no {backend} backend; use backend=native"
                + (f" or one of {offered}" if offered else "")
            )
        factory = _BACKEND_REGISTRY[(name, backend)]
    keys = accepted_keys(factory)
    if keys is not None:
        unknown = sorted(k for k in params if k not in keys)
        if unknown:
            raise ConfigError(f"attack {name} has no setting(s) {unknown}; accepted: {sorted(keys)}")
    shared = {k: v for k, v in (common or {}).items() if (keys is None or k in keys) and k not in params}
    try:
        return factory(**shared, **params)
    except TypeError as exc:
        raise ConfigError(f"attack {name}: {exc}") from exc


def attack_specs(section: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The selected attacks of an ``attack`` config node, in selection order, backend filled in."""
    if not section:
        return []
    backend = section.get("backend", "native")
    specs = []
    for key, value in section.items():
        if key == "backend":
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"attack.{key} must be an attack's settings; select attacks with attack=[fgsm,pgd]"
            )
        spec = dict(value)
        spec.setdefault("name", key)
        if spec.get("backend") is None and spec["name"] in {n for (n, _) in _BACKEND_REGISTRY}:
            spec["backend"] = backend
        spec.pop("backend", None) if spec.get("backend") is None else None
        specs.append(spec)
    if backend not in BACKENDS:
        raise ConfigError(f"attack.backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return specs
