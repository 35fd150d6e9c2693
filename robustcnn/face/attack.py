"""Physical patch attacks on face recognition: the dodging and impersonation losses, and one patch.

Why these losses: a recognizer decides by descriptor distances, under two rules at once, verification
(distance to a claimed identity below ``threshold``) and closed-set identification (nearest gallery
entry). Dodging pushes the descriptor away from the attacker's own gallery descriptor and, with a
margin term, behind the nearest other identity; impersonation pulls it toward the target's
descriptor and, with a margin term, ahead of every other identity (the attacker included). Distances
are divided by the threshold, so loss weights (TV, NPS) mean the same on every embedder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from robustcnn.face.evaluation import check_indices, distances
from robustcnn.face.patch import ModelLoss, PatchResult, PatchSettings, optimise_patch
from robustcnn.models.face.recognizer import FaceRecognizer

#: Margin of the rank terms, as a fraction of the verification threshold.
RANK_MARGIN = 0.1
#: Dodging stops pushing the own distance beyond this many thresholds.
DODGING_CAP = 2.0


def _nearest_other(d: Tensor, index: int) -> Tensor | None:
    """Distance [n] to the nearest gallery entry other than ``index`` (None for a 1-entry gallery)."""
    if d.shape[1] < 2:
        return None
    blocked = torch.zeros_like(d)
    blocked[:, index] = float("inf")
    return (d + blocked).min(1).values


def dodging_loss(recognizer: FaceRecognizer, gallery: Tensor, attacker_index: int) -> ModelLoss:
    """Loss to minimise: -min(d(own), 2 thr) + relu(d(nearest other) - d(own) + margin), in threshold units.

    The first term leaves the own identity's verification ball (capped at twice the threshold: a
    descriptor pushed off to infinity is near nobody, which would fight the rank term); the second
    brings another identity nearer than the attacker's own. Success (for early stopping): rejected by
    verification AND someone else is nearest.
    """
    thr = recognizer.threshold

    def loss(x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        d = distances(recognizer.embed(x_adv).float(), gallery)
        own = d[:, attacker_index]
        value = -own.clamp(max=DODGING_CAP * thr) / thr
        other = _nearest_other(d, attacker_index)
        if other is not None:
            value = value + torch.relu(other - own + RANK_MARGIN * thr) / thr
        success = (own >= thr) & (d.argmin(1) != attacker_index)
        return value, success

    return ModelLoss(loss, (recognizer.embedder,))


def impersonation_loss(recognizer: FaceRecognizer, gallery: Tensor, target_index: int) -> ModelLoss:
    """Loss to minimise: d(target) + relu(d(target) - d(nearest other) + margin), in threshold units.

    Success (for early stopping): accepted as the target AND the target is nearest.
    """
    thr = recognizer.threshold

    def loss(x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        d = distances(recognizer.embed(x_adv).float(), gallery)
        to_target = d[:, target_index]
        value = to_target / thr
        other = _nearest_other(d, target_index)
        if other is not None:
            value = value + torch.relu(to_target - other + RANK_MARGIN * thr) / thr
        success = (to_target < thr) & (d.argmin(1) == target_index)
        return value, success

    return ModelLoss(loss, (recognizer.embedder,))


def ensemble_loss(losses: list[ModelLoss]) -> ModelLoss:
    """The mean of the members' losses (each in units of its own threshold, so no recognizer dominates
    by the scale of its descriptors); a draw succeeds only when it fools every member."""

    def loss(x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        values, successes = zip(*(member(x_adv, index) for member in losses), strict=True)
        return torch.stack(values).mean(0), torch.stack(successes).all(0)

    return ModelLoss(loss, tuple(module for member in losses for module in member.modules))


def _goal_loss(recognizer: FaceRecognizer, gallery: Tensor, a: int, t: int | None) -> ModelLoss:
    return dodging_loss(recognizer, gallery, a) if t is None else impersonation_loss(recognizer, gallery, t)


def attack_face(
    recognizer: FaceRecognizer,
    attacker_faces: Tensor,
    gallery_descriptors: Tensor,
    attacker_index: int,
    target_index: int | None,
    mask: Tensor,
    settings: PatchSettings | None = None,
    init: str | Tensor = "random",
    ensemble: Sequence[tuple[FaceRecognizer, Tensor]] = (),
) -> PatchResult:
    """One patch for the attacker's photos [K, 3, H, W]: dodging (``target_index`` None) or
    impersonation of ``target_index``; ``gallery_descriptors`` [G, D], one per identity.

    ``ensemble``: more recognizers, each with its own gallery descriptors, optimised against at the
    same time (:func:`ensemble_loss`: every EOT draw goes through all of them)."""
    members = [(recognizer, gallery_descriptors), *ensemble]
    losses = []
    for member, descriptors in members:
        check_indices(descriptors, attacker_index, target_index)
        gallery = descriptors.detach().float().to(attacker_faces.device)
        losses.append(_goal_loss(member, gallery, attacker_index, target_index))
    loss = losses[0] if len(losses) == 1 else ensemble_loss(losses)
    modules = [member.embedder for member, _ in members]
    return optimise_patch(loss, attacker_faces, mask, settings, init, modules=modules)
