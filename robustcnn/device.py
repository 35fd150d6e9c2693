"""Device choice, seeding and thread settings: the few global knobs every job sets first."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from robustcnn.errors import ConfigError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit name must be available here."""
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
    if threads is None:
        return
    if int(threads) < 1:
        raise ConfigError(f"threads={threads} must be >= 1 (or null for torch's default)")
    torch.set_num_threads(int(threads))
