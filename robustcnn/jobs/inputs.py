"""What a job builds from its config before any work: the plain config dict, the dataset, the model
check, the transfer attacks' surrogates.

Why apart from the job kinds: the classifier job and the audit job build their inputs the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustcnn.attacks import Attack, Transfer
from robustcnn.data import Dataset, load_dataset
from robustcnn.defenses import Defense
from robustcnn.errors import ConfigError
from robustcnn.jobs.trained import make_model, obtain_model


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations into a plain dict; a missing mandatory value becomes a ConfigError."""
    try:
        # OmegaConf types the result as any container; a DictConfig always gives a dict
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a value"
        detail = " ".join(str(exc.msg if hasattr(exc, "msg") else exc).split())
        raise ConfigError(
            f"config value {key} is missing or invalid ({detail}); set it on the command line, e.g. {key}=..."
        ) from exc


def load_data(config: dict[str, Any]) -> Dataset:
    section = dict(config["data"])
    name = section.pop("name", None)
    if not name:
        raise ConfigError("the data config has no 'name'; pick a preset such as data=mnist5k")
    if name in ("faces", "face_folder"):
        raise ConfigError(
            f"data={name} holds face crops for the face patch study, not a classifier dataset; "
            "run it with task=face_patch (e.g. experiment=face_smoke data=" + name + ")"
        )
    return load_dataset(name, **section)


def check_model_config(config: dict[str, Any], data: Dataset, defense: Defense) -> None:
    """Build the model once before the run opens, so a bad ``model.*`` value is one line, not a FAILED run.

    The build runs under a forked random state: the model trained later draws the same initial
    weights as it would without this check (seeded runs stay reproducible).
    """
    with torch.random.fork_rng(devices=[]):
        make_model(config, data, defense.model_overrides())


def bind_surrogates(
    attacks: list[Attack], config: dict[str, Any], data: Dataset, device: torch.device, progress: bool
) -> None:
    """Train (or load from the cache) each transfer attack's surrogate: same data, own seed."""
    for attack in attacks:
        if isinstance(attack, Transfer):
            surrogate_config = {
                **config,
                "model": {"name": attack.surrogate, "dropout": 0.0},
                "defense": {"name": "none"},
                "seed": int(config.get("seed", 0)) + 1,
            }
            trained = obtain_model(surrogate_config, data, device, progress=progress)
            attack.bind(trained.model)

