"""Device choice, seeding and thread settings: the few global knobs every job sets first."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from robustcnn.errors import ConfigError

#: More threads than this is a typo (torch would try to start them all, or overflow).
MAX_THREADS = 1024


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit name must be available here."""
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"device={name!r} must be a device name; use auto, cpu, cuda, cuda:N or mps")
    choice = (name or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} was asked for but CUDA is not available here; use device=auto or cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError(
            f"device={name} was asked for but MPS is not available here; use device=auto or cpu"
        )
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run is reproducible on the same device."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def set_threads(threads: int | None) -> None:
    """Limit torch's CPU threads (parallel launchers run one thread per job)."""
    checked = check_threads(threads)
    if checked is not None:
        torch.set_num_threads(checked)


def check_threads(threads: object) -> int | None:
    """``threads`` as a whole number in [1, MAX_THREADS], or None (torch's default)."""
    if threads is None:
        return None
    number = threads if isinstance(threads, (int, float)) and not isinstance(threads, bool) else None
    whole = isinstance(number, int) or (isinstance(number, float) and number.is_integer())
    if number is None or not whole or number < 1:
        raise ConfigError(f"threads={threads!r} must be a whole number >= 1 (or null for torch's default)")
    if number > MAX_THREADS:
        raise ConfigError(
            f"threads={int(number)} is more than {MAX_THREADS}; use at most the number of CPU cores "
            f"({os.cpu_count()} here), or null for torch's default"
        )
    return int(number)
