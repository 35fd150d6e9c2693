"""Where the Hydra configs live and how to compose them outside the CLI (tests, notebooks).

The configs are the top-level ``conf/`` of a checkout; a wheel ships the same files as the
package ``robustcnn.conf``. Looking in both places is what makes the CLI work from a checkout
(including an editable install) and from an installed wheel alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustcnn.errors import ConfigError


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


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> Any:
    """Compose the config with Hydra's compose API (no output folder, no logging changes)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robustcnn.launchers import quiet_schema_matching

    quiet_schema_matching()  # conf/hydra/launcher/ presets share the plugins' names on purpose
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
