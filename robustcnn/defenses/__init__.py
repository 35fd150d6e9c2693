"""Defenses: adversarial training, dropout, pruning, regularisation; each plugs into the one training loop."""

from __future__ import annotations

# importing the modules registers their defenses
from robustcnn.defenses import adversarial_training, dropout, pruning, regularisation  # noqa: F401
from robustcnn.defenses.base import (
    Defense,
    available_defenses,
    build_defense,
    register_defense,
    weights_identity,
)

__all__ = ["Defense", "available_defenses", "build_defense", "register_defense", "weights_identity"]
