"""Attacks: one small file each, one base class that enforces the threat model for all of them."""

from __future__ import annotations

from robustcnn.attacks.apgd import APGD, APGDT
from robustcnn.attacks.base import Attack
from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.contract import AttackInvariantError
from robustcnn.attacks.eot import make_eot, with_eot
from robustcnn.attacks.fgsm import FGSM
from robustcnn.attacks.fmn import FMN
from robustcnn.attacks.gradient import GradientAttack
from robustcnn.attacks.noise import RandomNoise
from robustcnn.attacks.pgd import PGD
from robustcnn.attacks.registry import (
    BACKENDS,
    attack_specs,
    available_attacks,
    build_attack,
    register_attack,
    register_backend,
)
from robustcnn.attacks.result import AttackResult
from robustcnn.attacks.square import Square
from robustcnn.attacks.transfer import Transfer

register_attack("fgsm")(FGSM)
register_attack("pgd")(PGD)
register_attack("apgd")(APGD)
register_attack("apgd_t")(APGDT)
register_attack("fmn")(FMN)
register_attack("noise")(RandomNoise)
register_attack("square")(Square)
register_attack("transfer")(Transfer)
register_attack("eot")(make_eot)

# the torchattacks / ART versions of fgsm and pgd (the libraries themselves are imported lazily)
import robustcnn.attacks.backends  # noqa: E402, F401, I001

__all__ = [
    "APGD",
    "APGDT",
    "BACKENDS",
    "FGSM",
    "FMN",
    "PGD",
    "Attack",
    "AttackInvariantError",
    "AttackResult",
    "GradientAttack",
    "PerturbContext",
    "RandomNoise",
    "Square",
    "attack_specs",
    "available_attacks",
    "build_attack",
    "register_attack",
    "register_backend",
    "Transfer",
    "make_eot",
    "with_eot",
]
