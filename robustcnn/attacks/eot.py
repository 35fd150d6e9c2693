"""EOT (Athalye et al. 2018): attack a stochastic model with gradients averaged over N draws.

A randomised defense (dropout kept on at inference) gives a different gradient on every pass; a
single-sample gradient under-estimates the attacker. :func:`with_eot` is the one way an EOT
variant is made: ``eot`` (an attack of the registry, configured as ``attack=eot``) builds a
gradient attack and derives it, and the battery derives one from every gradient attack it runs
on a stochastic model.
"""

from __future__ import annotations

from typing import Any

from robustcnn.attacks.gradient import GradientAttack
from robustcnn.attacks.registry import available_attacks, check_settings, registered_factory, setting_defaults
from robustcnn.config import config_int, show
from robustcnn.errors import ConfigError


def with_eot(attack: GradientAttack, samples: int) -> GradientAttack:
    """``attack`` with its gradient averaged over ``samples`` draws, reporting as ``eot_<name>``."""
    return attack.with_(eot_samples=samples, name=f"eot_{attack.name}")


def gradient_attack_class(name: object) -> type[GradientAttack] | None:
    """The registered gradient attack class called ``name``, None if there is none."""
    factory = registered_factory(name) if isinstance(name, str) else None
    if isinstance(factory, type) and issubclass(factory, GradientAttack):
        return factory
    return None


def make_eot(*, attack: str = "pgd", samples: int = 20, **settings: Any) -> GradientAttack:
    """Build ``attack`` (fgsm or pgd, any backend setting removed) with ``samples`` EOT draws.

    ``settings`` are the wrapped attack's, straight from the config (Any: untyped until checked here).
    """
    factory = gradient_attack_class(attack)
    if factory is None:
        gradient_attacks = sorted(n for n in available_attacks() if gradient_attack_class(n) is not None)
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
    return with_eot(factory(**settings), samples)
