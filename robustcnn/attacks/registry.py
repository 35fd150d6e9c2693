"""Attack registry and construction from config.

Config shape (the ``attack`` group, Hydra multiple selection): ``{backend: native, pgd: {...},
fgsm: {...}}``; every selected attack sits under its own key, and ``backend`` applies to every
attack that has one unless the attack sets its own.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from robustcnn.attacks.base import Attack, constructor_parameters
from robustcnn.config import config_bool, config_float, config_int, show
from robustcnn.errors import ConfigError

#: A config section as Hydra hands it over: Any because YAML values are untyped until checked here.
ConfigSection = Mapping[str, Any]

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


def registered_factory(name: str) -> Callable[..., Attack] | None:
    """What builds the native attack registered as ``name`` (a class or a function), None if none is."""
    return _REGISTRY.get(name)


def accepted_keys(factory: Callable[..., object]) -> set[str] | None:
    """Keyword arguments a class (with its bases) accepts; None for a function taking **kwargs."""
    if not inspect.isclass(factory):
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):
            return set()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
    return set(setting_defaults(factory))


def register_backend(name: str, backend: str) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    """Register the same attack run through another library (same settings, same meaning)."""

    def decorate(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        _BACKEND_REGISTRY[(name, backend)] = factory
        return factory

    return decorate


_BACKEND_REGISTRY: dict[tuple[str, str], Callable[..., Attack]] = {}


def setting_defaults(factory: Callable[..., object]) -> dict[str, inspect.Parameter]:
    """Keyword parameters of a class (most derived first, through its bases) or a function, by name."""
    if inspect.isclass(factory):
        return constructor_parameters(factory)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p for p in params if p.kind in kinds and p.name != "self"}


def check_settings(factory: Callable[..., object], params: ConfigSection, prefix: str) -> dict[str, Any]:
    """Type-check settings against the factory's defaults; every error names ``prefix.<key>``.

    A setting whose default is a bool must be a bool, an int default a whole number (3.0 becomes 3),
    a float default a finite number and a str default a string; a ``None`` default takes None or
    what its annotation names (``float | None``: a finite number). Ranges stay with the attack.
    """
    checked = dict(params)
    defaults = setting_defaults(factory)
    for key, value in params.items():
        param = defaults.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            continue
        default, name = param.default, f"{prefix}.{key}"
        if default is None:
            if value is None:
                continue
            annotation = str(param.annotation)
            if "float" in annotation or "int" in annotation:
                checked[key] = config_float(value, name)
            elif "str" in annotation and not isinstance(value, str):
                raise ConfigError(f"{name}={show(value)} must be a string or null")
        elif isinstance(default, bool):
            checked[key] = config_bool(value, name)
        elif isinstance(default, int):
            checked[key] = config_int(value, name)
        elif isinstance(default, float):
            checked[key] = config_float(value, name)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{name}={show(value)} must be a string, e.g. {name}={default}")
    return checked


#: Job-wide attack settings (``common``) and the config keys they come from.
COMMON_KEYS = {
    "batch_size": "eval.attack_batch_size",
    "keep_examples": "eval.keep_examples",
    "seed": "seed",
    "amp": "eval.amp",
}


def _check_common(common: ConfigSection) -> dict[str, Any]:
    checked = dict(common)
    for key, value in common.items():
        name = COMMON_KEYS.get(key, key)
        if key == "batch_size":
            checked[key] = config_int(value, name, minimum=1)
        elif key == "keep_examples":
            checked[key] = config_int(value, name, minimum=0)
        elif key == "seed":
            checked[key] = config_int(value, name)
        elif key == "amp":
            checked[key] = config_bool(value, name)
    return checked


def qualify(message: str, name: str) -> str:
    """``attack.steps=0 ...`` raised inside an attack becomes ``attack.<name>.steps=0 ...``."""
    return re.sub(rf"^attack\.(?!{re.escape(name)}\.)(\w+)=", rf"attack.{name}.\1=", message)


def build_attack(spec: ConfigSection, common: ConfigSection | None = None) -> Attack:
    """Build one attack from its config node (``name``, ``backend``, settings).

    ``common`` holds job-wide settings (seed, batch size, amp) used where the attack accepts them
    and does not set them itself.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"an attack's settings must be a section, got {show(spec)}; select attacks with attack=[fgsm,pgd]"
        )
    params = dict(spec)
    name = params.pop("name", None)
    backend = params.pop("backend", None) or "native"
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown attack {show(name)}; choose from {', '.join(available_attacks())}")
    if backend not in BACKENDS:
        raise ConfigError(
            f"attack.{name}.backend={show(backend)} is unknown; choose one of {', '.join(BACKENDS)}"
        )
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
    params = check_settings(factory, params, f"attack.{name}")
    shared = {k: v for k, v in (common or {}).items() if (keys is None or k in keys) and k not in params}
    shared = _check_common(shared)
    try:
        return factory(**shared, **params)
    except ConfigError as exc:
        raise ConfigError(qualify(str(exc), name)) from exc
    except (TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"attack {name}: {detail}; check the settings under attack.{name}") from exc


def attack_specs(section: ConfigSection | None) -> list[dict[str, Any]]:
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
