"""EOT (Athalye et al. 2018): attack a stochastic model with gradients averaged over N draws.

A randomised defense (dropout kept on at inference) gives a different gradient on every pass; a
single-sample gradient under-estimates the attacker. ``eot`` wraps any gradient attack of the
registry and sets its ``eot_samples``; the battery does this automatically for stochastic models.
"""

from __future__ import annotations

from typing import Any

from robustcnn.attacks.gradient import GradientAttack
from robustcnn.attacks.registry import _REGISTRY, check_settings, setting_defaults
from robustcnn.config import config_int, show
from robustcnn.errors import ConfigError


def make_eot(*, attack: str = "pgd", samples: int = 20, **settings: Any) -> GradientAttack:
    """Build ``attack`` (fgsm or pgd, any backend setting removed) with ``samples`` EOT draws."""
    factory = _REGISTRY.get(attack) if isinstance(attack, str) else None
    if factory is None or not (isinstance(factory, type) and issubclass(factory, GradientAttack)):
        gradient_attacks = sorted(
            n for n, f in _REGISTRY.items() if isinstance(f, type) and issubclass(f, GradientAttack)
        )
        raise ConfigError(
            f"eot wraps a gradient attack; attack.eot.attack={show(attack)} is not one of {gradient_attacks}"
        )
    samples = config_int(samples, "attack.eot.samples", minimum=1, hint=" (EOT draws per gradient)")
    keys = setting_defaults(factory)
    unknown = sorted(k for k in settings if k not in keys or k == "eot_samples")
    if unknown:
        accepted = sorted({"attack", "samples", *keys} - {"eot_samples"})
        raise ConfigError(f"attack eot has no setting(s) {unknown}; accepted: {accepted}")
    settings = check_settings(factory, settings, "attack.eot")
    built = factory(eot_samples=samples, **settings)
    built.name = f"eot_{attack}"  # type: ignore[misc]
    return built
