"""What ``robustcnn run`` can check on its command line before Hydra starts.

Why before Hydra: Hydra reports a bad YAML file or an unwritable output folder as a traceback; these
checks give one line naming the file or folder and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from robustcnn.errors import ConfigError
from robustcnn.files import check_output_folder


def is_multirun(hydra_args: Sequence[str]) -> bool:
    """Whether a ``robustcnn run`` command line asks Hydra for a sweep (``-m``)."""
    return any(arg in ("-m", "--multirun") for arg in hydra_args)


def _option_values(args: Sequence[str], names: tuple[str, ...]) -> list[str]:
    """Values of ``--name VALUE`` / ``--name=VALUE`` options in a Hydra command line."""
    values = []
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(f"{name}="):
                values.append(arg.split("=", 1)[1])
    return values


def check_user_configs(folders: Sequence[str]) -> None:
    """Parse every YAML file of a user's config folder before Hydra does, one line per problem.

    Why: Hydra reports a YAML error (a syntax error, a ``!!python/object`` tag, which the safe
    loader refuses) as a traceback; the user needs the file and the fix.
    """
    from omegaconf import OmegaConf

    for raw in folders:
        folder = Path(raw).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"config folder {folder} does not exist; fix --config-dir")
        for path in sorted(folder.rglob("*.yaml")):
            try:
                OmegaConf.load(path)
            except Exception as exc:  # yaml and OmegaConf raise many types; all mean "fix this file"
                detail = " ".join(str(exc).split())[:200]
                raise ConfigError(
                    f"config file {path} cannot be loaded ({type(exc).__name__}: {detail}); fix the YAML "
                    "(configs are loaded safely: python object tags are never run)"
                ) from exc


def check_run_arguments(hydra_args: Sequence[str]) -> None:
    """What ``robustcnn run`` can check before Hydra starts: user config files, the output folder.

    Hydra creates the output folder itself and reports a failure as a traceback; checking the
    folder named on the command line (or the default under the working directory) first gives one
    line. ``${now:...}`` parts are judged by the folder above them.
    """
    check_user_configs(_option_values(hydra_args, ("--config-dir", "-cd")))
    multirun = is_multirun(hydra_args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = "multirun" if multirun else "outputs"
    for arg in hydra_args:
        name, _, value = arg.lstrip("+").partition("=")
        if name == key and value:
            folder = value.split("${", 1)[0] or "."
    check_output_folder(folder, "the output folder", key)
