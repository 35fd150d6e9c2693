"""Where the Hydra configs live and how to compose them outside the CLI (tests, notebooks).

The configs are the top-level ``conf/`` of a checkout; a wheel ships the same files as the
package ``robustcnn.conf``. Looking in both places is what makes the CLI work from a checkout
(including an editable install) and from an installed wheel alike.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustcnn.errors import ConfigError

if TYPE_CHECKING:  # omegaconf comes with Hydra, which is imported only to compose
    from omegaconf import DictConfig


def conf_dir() -> Path:
    """Absolute path of the Hydra config folder (checkout first, then the installed package)."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    spec = importlib.util.find_spec("robustcnn.conf")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "config.yaml").is_file():
                return Path(location)
    raise ConfigError(
        "robustcnn's Hydra configs were not found (neither conf/ next to the package nor robustcnn.conf); "
        "reinstall the package (pip install robustcnn) or run from a checkout"
    )


def config_groups() -> dict[str, list[str]]:
    """Every config group and its choices, e.g. ``{"model": ["lenet5", ...], ...}``."""
    root = conf_dir()
    groups: dict[str, list[str]] = {}
    for yaml_file in sorted(root.rglob("*.yaml")):
        rel = yaml_file.relative_to(root)
        if len(rel.parts) < 2:
            continue
        groups.setdefault("/".join(rel.parts[:-1]), []).append(yaml_file.stem)
    return groups


_SCHEMA_WARNING = r"\s*'hydra/launcher/[^']+' is validated against ConfigStore schema with the same name"


def quiet_schema_matching() -> None:
    """Silence Hydra's deprecation warning for our same-named launcher presets (nothing else).

    Why: conf/hydra/launcher/ presets share the launcher plugins' structured-config names on purpose
    (so ``hydra/launcher=joblib`` picks our preset, merged onto the plugin's schema), and Hydra 1.3
    warns about that merge each time it composes.
    """
    warnings.filterwarnings("ignore", message=_SCHEMA_WARNING, category=UserWarning)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config with Hydra's compose API (no output folder, no logging changes)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    quiet_schema_matching()  # conf/hydra/launcher/ presets share the plugins' names on purpose
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


# -- typed reads of config values --------------------------------------------------------------
# Values arrive from YAML and the command line, where `epochs=abc`, `lr=[1]` or `amp=maybe` are easy
# mistakes; int()/float()/bool() on them would fail deep inside (a traceback that names no key) or,
# worse, succeed (bool("maybe") is True, int(1.5) is 1). These helpers fail with a ConfigError that
# names the key, the value and what is expected, on one line.


def show(value: object, limit: int = 80) -> str:
    """A value as it appears in an error message: repr, one line, cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def config_bool(value: object, key: str) -> bool:
    """A real bool (``true``/``false``); strings and numbers are refused, not guessed."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={show(value)} must be true or false; set {key}=true or {key}=false")
    return value


def config_int(value: Any, key: str, *, minimum: int | None = None, hint: str = "") -> int:
    """A whole number (an integral float such as 3.0 is accepted), optionally ``>= minimum``."""
    # value: Any, not object: typeshed's numbers.Real declares no __int__, so int() of a value
    # checked to be a Real would not type-check although every Real converts
    import numbers

    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole:
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"{key}={show(value)} must be a whole number{bound}{hint}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ConfigError(f"{key}={number} must be >= {minimum}{hint}")
    return number


def config_float(
    value: object,
    key: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    below: bool = False,
    hint: str = "",
) -> float:
    """A finite number, optionally in a range (``above``/``below``: the bound itself is excluded)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{key}={show(value)} must be a finite number{hint}")
    number = float(value)
    low_ok = minimum is None or (number > minimum if above else number >= minimum)
    high_ok = maximum is None or (number < maximum if below else number <= maximum)
    if not (low_ok and high_ok):
        if minimum is not None and maximum is not None:
            span = f"in {'(' if above else '['}{minimum:g}, {maximum:g}{')' if below else ']'}"
        elif minimum is not None:
            span = f"{'>' if above else '>='} {minimum:g}"
        else:
            span = f"{'<' if below else '<='} {maximum:g}"
        raise ConfigError(f"{key}={number:g} must be {span}{hint}")
    return number


def config_section(value: object, key: str, known: Sequence[str] | None = None) -> dict[str, Any]:
    """A config section (mapping); with ``known``, a key outside it is refused and the known ones listed."""
    from collections.abc import Mapping

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        example = f"{key}.{known[0]}=..." if known else f"{key}.<setting>=..."
        raise ConfigError(
            f"{key}={show(value)} must be a section of settings; set one of them, e.g. {example}"
        )
    section = dict(value)
    if known is not None:
        unknown = sorted(str(k) for k in section if k not in known)
        if unknown:
            raise ConfigError(f"{key} has no setting(s) {unknown}; accepted: {sorted(known)}")
    return section
