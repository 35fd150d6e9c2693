"""EOT (Athalye et al. 2018): attack a stochastic model with gradients averaged over N draws.

A randomised defense (dropout kept on at inference) gives a different gradient on every pass; a
single-sample gradient under-estimates the attacker. ``eot`` wraps any gradient attack of the
registry and sets its ``eot_samples``; the battery does this automatically for stochastic models.
"""

from __future__ import annotations

from typing import Any

from robustcnn.attacks.gradient import GradientAttack
from robustcnn.errors import ConfigError


def make_eot(*, attack: str = "pgd", samples: int = 20, **settings: Any) -> GradientAttack:
    """Build ``attack`` (fgsm or pgd, any backend setting removed) with ``samples`` EOT draws."""
    from robustcnn.attacks.registry import _REGISTRY

    factory = _REGISTRY.get(attack)
    if factory is None or not (isinstance(factory, type) and issubclass(factory, GradientAttack)):
        gradient_attacks = sorted(
            n for n, f in _REGISTRY.items() if isinstance(f, type) and issubclass(f, GradientAttack)
        )
        raise ConfigError(
            f"eot wraps a gradient attack; attack.eot.attack={attack!r} is not one of {gradient_attacks}"
        )
    if int(samples) < 1:
        raise ConfigError(f"attack.eot.samples={samples} must be >= 1")
    built = factory(eot_samples=int(samples), **settings)
    built.name = f"eot_{attack}"  # type: ignore[misc]
    return built
