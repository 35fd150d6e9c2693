"""Which photos of a person enrol them, which an attack is optimised on, and which judge it.

Why a split: a physical attacker wears the patch in front of a camera, on a photo the optimisation
never saw, and is compared with a template the recognizer enrolled from yet another photo. Scoring
a patch on the photo it was optimised on (or against that photo's own descriptor) measures how well
it overfits, not whether it works. So, per identity with several photos, a seeded permutation gives:

* 3 or more photos: 1 enrolment photo, ``(n - 1) // 2`` evaluation photos, the rest to optimise on;
  enrolment, optimisation and evaluation photos are disjoint (``held_out = "photos"``), and as an
  impersonation target its enrolment template comes from photos the optimisation never saw.
* 2 photos: the enrolment photo is also what the attacker optimises on (they know their own face),
  the other photo is the evaluation photo (``held_out = "photos"`` for dodging); as a target its
  template is the photo the attack was optimised toward.
* 1 photo: that photo plays every role; only the physical-transform draws are held out
  (``held_out = "transforms_only"``).

The split is recorded by file name in results.json, so a reader can check that no photo was reused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any  # Any: the JSON record

#: What a figure was judged on that the optimisation never saw.
HELD_OUT_PHOTOS = "photos"
HELD_OUT_TRANSFORMS = "transforms_only"


@dataclass(frozen=True)
class PhotoSplit:
    """Rows (indices into a gallery) of one identity's photos in each role."""

    enrolment: tuple[int, ...]
    optimisation: tuple[int, ...]
    evaluation: tuple[int, ...]

    @property
    def held_out(self) -> str:
        """``photos`` when no evaluation photo was optimised on, else ``transforms_only``."""
        disjoint = not set(self.evaluation) & set(self.optimisation)
        return HELD_OUT_PHOTOS if disjoint else HELD_OUT_TRANSFORMS

    @property
    def template_unseen(self) -> bool:
        """Whether the enrolment template comes from photos the optimisation never saw."""
        return not set(self.enrolment) & set(self.optimisation)

    def to_dict(self, files: list[str]) -> dict[str, Any]:
        """The split by file name (``files``: the gallery's photo name of each row), and its label."""
        return {
            "enrolment": [files[i] for i in self.enrolment],
            "optimisation": [files[i] for i in self.optimisation],
            "evaluation": [files[i] for i in self.evaluation],
            "held_out": self.held_out,
            "template_unseen": self.template_unseen,
        }


def split_photos(rows: list[int], seed: int, identity: str) -> PhotoSplit:
    """The seeded split of one identity's gallery ``rows`` (see the module notes).

    The permutation depends on ``seed`` and the identity's name only, so adding a person to a gallery
    never reshuffles the others, and the same seed gives the same split on every machine.
    """
    if not rows:
        raise ValueError(f"identity {identity!r} has no photo")
    order = list(rows)
    random.Random(f"{seed}:{identity}").shuffle(order)
    n = len(order)
    if n == 1:
        only = (order[0],)
        return PhotoSplit(only, only, only)
    if n == 2:
        return PhotoSplit((order[0],), (order[0],), (order[1],))
    n_eval = (n - 1) // 2
    return PhotoSplit((order[0],), tuple(order[1 + n_eval :]), tuple(order[1 : 1 + n_eval]))


def impersonation_held_out(attacker: PhotoSplit, target: PhotoSplit) -> str:
    """``photos`` when the attacker's evaluation photos AND the target's template were never optimised
    on (the attack aimed at other photos of the target than the ones the recognizer enrolled)."""
    if attacker.held_out == HELD_OUT_PHOTOS and target.template_unseen:
        return HELD_OUT_PHOTOS
    return HELD_OUT_TRANSFORMS
