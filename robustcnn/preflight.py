"""Checks that run before any work: can the job's output folders be written, is there room.

Why before: a job that trains for an hour and then cannot write its results has lost the hour.
A folder that does not exist yet is judged by its nearest existing parent (that is where it will
be created). The free-space floor is ``ROBUSTCNN_MIN_FREE_MB`` (default 50 MB: a job writes a few
MB of results and plots, a cache entry a few MB of weights); 0 turns the check off.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from robustcnn.errors import ConfigError, RobustCNNError

DEFAULT_MIN_FREE_MB = 50


class OutputError(RobustCNNError):
    """An output folder cannot be created or written, or its disk is (nearly) full."""


def min_free_bytes() -> int:
    raw = os.environ.get("ROBUSTCNN_MIN_FREE_MB", str(DEFAULT_MIN_FREE_MB))
    try:
        return max(0, int(float(raw) * 1024 * 1024))
    except ValueError as exc:
        raise OutputError(f"ROBUSTCNN_MIN_FREE_MB={raw!r} is not a number of megabytes; set e.g. 50") from exc


def nearest_existing(path: Path) -> Path:
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_folder(path: str | os.PathLike[str], what: str, setting: str) -> None:
    """Fail with the fix unless ``path`` can be created and written and its disk has room.

    ``what`` names the folder for the user ("the job's output folder"), ``setting`` the option
    that moves it ("hydra.run.dir").
    """
    folder = Path(path)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(
            f"{what} {folder} cannot be created: {existing} is a file, not a folder; set {setting} elsewhere"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder} is not writable ({existing}); set {setting} to a writable folder")
    floor = min_free_bytes()
    if floor:
        free = shutil.disk_usage(existing).free
        if free < floor:
            raise OutputError(
                f"the disk holding {what} {folder} has {free / 2**20:.0f} MB free, under the "
                f"{floor / 2**20:.0f} MB a job needs; free some space, set {setting} to another disk, "
                "or lower ROBUSTCNN_MIN_FREE_MB"
            )


def write_failure(path: Path, exc: OSError) -> OutputError:
    """A write that failed mid-job (disk full, folder removed): the message names the file and fix."""
    return OutputError(
        f"cannot write {path} ({exc.strerror or exc}); free space on its disk or choose another output folder"
    )


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
