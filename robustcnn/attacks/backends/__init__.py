"""Library backends: the native FGSM and PGD run by torchattacks or ART (``attack.backend``).

Each backend class subclasses the native attack, so it accepts exactly the native settings and the
same config means the same attack; see each module for the conventions aligned and for what a
library cannot do (refused with a ConfigError rather than silently changed).

Importing this package registers the four classes but imports neither library: torchattacks and
ART take seconds to import, so they are imported on first use, and a missing one is reported
(with its pip command) when the attack is built.
"""

from __future__ import annotations

from robustcnn.attacks.backends.art_backend import ArtFGSM, ArtPGD
from robustcnn.attacks.backends.torchattacks_backend import TorchattacksFGSM, TorchattacksPGD
from robustcnn.attacks.registry import register_backend

register_backend("fgsm", "torchattacks")(TorchattacksFGSM)
register_backend("pgd", "torchattacks")(TorchattacksPGD)
register_backend("fgsm", "art")(ArtFGSM)
register_backend("pgd", "art")(ArtPGD)

__all__ = ["ArtFGSM", "ArtPGD", "TorchattacksFGSM", "TorchattacksPGD"]
