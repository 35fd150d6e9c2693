"""The ``eval`` section and the attacks a job's config selects, validated before any training.

Why here: both the classifier job and the audit build their battery from these, and a bad attack
or eval value must fail in seconds, before an epoch is spent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from robustcnn.attacks import Attack, attack_specs, build_attack
from robustcnn.config import config_bool, config_int, config_section
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel


@dataclass(frozen=True)
class EvalSettings:
    """The ``eval`` section, checked: how many test images, in which batches."""

    batch_size: int = 1000
    max_samples: int | None = None  # None: the whole test split
    attack_samples: int | None = None  # None: every evaluated image
    attack_batch_size: int = 500
    amp: bool = False
    keep_examples: int = 8
    #: Attribution maps of the kept examples (robustcnn.evaluation.attributions).
    attributions: bool = True

    @classmethod
    def from_mapping(cls, section: Any) -> EvalSettings:
        """Build from the ``eval`` section (a mapping or OmegaConf node from YAML: untyped until checked)."""
        known = [f.name for f in dataclasses.fields(cls)]
        values = config_section(section, "eval", known)

        def count(key: str, minimum: int = 1) -> int:
            hint = f" (or null for all); e.g. eval.{key}=1000" if key.endswith("samples") else ""
            return config_int(values.get(key, getattr(cls, key)), f"eval.{key}", minimum=minimum, hint=hint)

        def count_or_all(key: str) -> int | None:
            return None if values.get(key, getattr(cls, key)) is None else count(key)

        return cls(
            batch_size=count("batch_size"),
            max_samples=count_or_all("max_samples"),
            attack_samples=count_or_all("attack_samples"),
            attack_batch_size=count("attack_batch_size"),
            amp=config_bool(values.get("amp", cls.amp), "eval.amp"),
            keep_examples=count("keep_examples", minimum=0),
            attributions=config_bool(values.get("attributions", cls.attributions), "eval.attributions"),
        )


def plan_attacks(config: dict[str, Any]) -> tuple[ThreatModel | None, list[Attack]]:
    """Validate the threat model and build every selected attack before any training starts.

    ``config``: the job's resolved config (from YAML through Hydra: untyped until checked).
    """
    specs = attack_specs(config.get("attack"))
    if not specs:
        return None, []
    threat = ThreatModel.from_mapping(config.get("threat") or {})
    settings = EvalSettings.from_mapping(config.get("eval"))
    common = {
        "seed": config.get("seed", 0),
        "batch_size": settings.attack_batch_size,
        "amp": settings.amp,
        "keep_examples": settings.keep_examples,
    }
    attacks = [build_attack(spec, common) for spec in specs]
    if threat.knowledge == "black_box":
        white = [a.name for a in attacks if a.uses_gradients]
        if white:
            raise ConfigError(
                f"threat.knowledge=black_box excludes the gradient attacks {white}; "
                "select query/transfer attacks, e.g. attack=[square,transfer]"
            )
    return threat, attacks
