"""Judging one face patch on held-out draws, next to the same faces without it and with random noise.

Why a baseline per patch: a patch "succeeds" only if it does better than anything of the same shape
would. Each patch is judged with its own random patch (its own seed) on the very same held-out draws
(generator "evaluate", never the optimisation's), so the comparison is paired and the exact McNemar
test of :mod:`robustcnn.face.baselines` says whether the patch beats it (``beats_baseline``).
"""

from __future__ import annotations

from typing import Any  # Any: the JSON-able evaluation

import torch
from torch import Tensor

from robustcnn.errors import ConfigError
from robustcnn.face.baselines import ALPHA, paired_p_value
from robustcnn.face.masks import area_percent, check_mask
from robustcnn.face.patch import frozen_modules
from robustcnn.face.printability import non_printability_score, total_variation
from robustcnn.face.splits import HELD_OUT_TRANSFORMS
from robustcnn.face.transforms import Draws, PhysicalVariation, apply_patch, draw_generator, image_size
from robustcnn.models.face.recognizer import DEFAULT_THRESHOLD, FaceRecognizer


def distances(descriptors: Tensor, gallery: Tensor) -> Tensor:
    """Euclidean distances [n, G] with a smooth square root (finite gradient at distance 0, which a
    dodging attack starts from when the attacker's photo is also the gallery photo)."""
    return ((descriptors[:, None, :] - gallery[None, :, :]).pow(2).sum(-1) + 1e-12).sqrt()


def check_indices(gallery: Tensor, attacker_index: int, target_index: int | None) -> None:
    """Attacker and target are gallery entries, and impersonation targets someone else."""
    g = gallery.shape[0]
    if not 0 <= attacker_index < g:
        raise ConfigError(f"attacker index {attacker_index} is not in the gallery of {g} identities")
    if target_index is not None:
        if not 0 <= target_index < g:
            raise ConfigError(f"target index {target_index} is not in the gallery of {g} identities")
        if target_index == attacker_index:
            raise ConfigError(
                "impersonation needs a target other than the attacker (that would be no attack)"
            )


def random_patch_baseline(mask: Tensor, seed: int = 0) -> Tensor:
    """A patch of uniform random colours on the same mask [3, H, W] (0 outside): the noise baseline."""
    generator = draw_generator(seed, "evaluate", mask.device)
    generator.manual_seed(generator.initial_seed() ^ 0x5A5A5A5A)  # not the evaluation draws' stream
    noise = torch.rand((3, *mask.shape[-2:]), generator=generator, device=mask.device)
    return noise * mask.reshape(1, *mask.shape[-2:]).to(noise.dtype)


@torch.no_grad()
def _outcomes(
    recognizer: FaceRecognizer,
    faces: Tensor,
    patch: Tensor,
    mask: Tensor,
    draws: Draws,
    variation: PhysicalVariation,
    gallery: Tensor,
    reference: int,
    batch_size: int,
) -> dict[str, Tensor]:
    """Every face under every draw: distance to the reference (own / target) and the nearest entry."""
    k, n = faces.shape[0], len(draws)
    face_idx = torch.arange(k, device=faces.device).repeat_interleave(n)
    draw_idx = torch.arange(n, device=faces.device).repeat(k)
    dist, nearest = [], []
    for begin in range(0, k * n, batch_size):
        fi, di = face_idx[begin : begin + batch_size], draw_idx[begin : begin + batch_size]
        x = apply_patch(faces.index_select(0, fi), patch, mask, draws.select(di), variation)
        d = distances(recognizer.embed(x).float(), gallery)
        dist.append(d[:, reference])
        nearest.append(d.argmin(1))
    return {"distance": torch.cat(dist), "nearest": torch.cat(nearest)}


def _verified(out: dict[str, Tensor], at: float, dodging: bool) -> Tensor:
    """Per draw: did the verification rule at threshold ``at`` go the attacker's way?"""
    return out["distance"] >= at if dodging else out["distance"] < at


def _rates(out: dict[str, Tensor], threshold: float, reference: int, dodging: bool) -> dict[str, float]:
    identified = out["nearest"] != reference if dodging else out["nearest"] == reference
    return {
        "success_rate": float(_verified(out, threshold, dodging).float().mean()),
        "success_rate_identification": float(identified.float().mean()),
        # the same draws judged at face-api's published threshold, for comparison with other reports
        "success_rate_published_threshold": float(_verified(out, DEFAULT_THRESHOLD, dodging).float().mean()),
        "distance": float(out["distance"].mean()),
    }


def _paired(attacked: Tensor, noisy: Tensor) -> dict[str, Any]:
    """The paired comparison of per-draw successes: counts, discordant draws, p-value, verdict."""
    patch_only = int((attacked & ~noisy).sum())
    baseline_only = int((noisy & ~attacked).sum())
    p_value = paired_p_value(patch_only, baseline_only)
    return {
        "successes": int(attacked.sum()),
        "baseline_successes": int(noisy.sum()),
        "patch_only": patch_only,
        "baseline_only": baseline_only,
        "p_value": p_value,
        "beats_baseline": p_value < ALPHA,
    }


def evaluate_patch(
    recognizer: FaceRecognizer,
    faces: Tensor,
    patch: Tensor,
    mask: Tensor,
    gallery_descriptors: Tensor,
    attacker_index: int,
    target_index: int | None,
    variation: PhysicalVariation | None = None,
    n_draws: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    baseline_seed: int | None = None,
    held_out: str = HELD_OUT_TRANSFORMS,
) -> dict[str, Any]:
    """Success of ``patch`` on HELD-OUT draws (generator "evaluate", ``seed``), every face x every draw.

    Verification: dodging succeeds when the distance to the attacker's own descriptor is >= threshold,
    impersonation when the distance to the target's is < threshold; identification: the nearest
    gallery entry is not the attacker / is the target. Reported next to the same faces without a
    patch (``clean_*``) and with :func:`random_patch_baseline` (``random_patch``, seeded
    ``baseline_seed``, default ``seed``), on the same draws; ``beats_baseline``: the paired one-sided
    test at the calibrated threshold. ``held_out`` labels what the optimisation never saw.
    """
    check_indices(gallery_descriptors, attacker_index, target_index)
    variation = variation if variation is not None else PhysicalVariation.identity()
    device = faces.device
    mask = check_mask(mask, image_size(faces)).to(device)
    gallery = gallery_descriptors.detach().float().to(device)
    draws = variation.sample(n_draws, draw_generator(seed, "evaluate", device), image_size(faces), 1)
    dodging = target_index is None
    reference = attacker_index if target_index is None else target_index
    args = (variation, gallery, reference, batch_size)
    random_patch = random_patch_baseline(mask, seed if baseline_seed is None else baseline_seed)
    with frozen_modules([recognizer.embedder]):
        attacked = _outcomes(recognizer, faces, patch.to(device), mask, draws, *args)
        clean = _outcomes(
            recognizer, faces, torch.zeros_like(random_patch), torch.zeros_like(mask), draws, *args
        )
        noisy = _outcomes(recognizer, faces, random_patch, mask, draws, *args)
    thr = recognizer.threshold
    after, before, rand = (_rates(o, thr, reference, dodging) for o in (attacked, clean, noisy))
    paired = _paired(_verified(attacked, thr, dodging), _verified(noisy, thr, dodging))
    return {
        "goal": "dodging" if dodging else "impersonation",
        "held_out": held_out,
        "attacker_index": attacker_index,
        "target_index": target_index,
        "threshold": thr,
        "n_faces": int(faces.shape[0]),
        "n_draws": int(n_draws),
        "n_evaluations": int(faces.shape[0] * n_draws),
        "success_rate": after["success_rate"],
        "success_rate_identification": after["success_rate_identification"],
        "success_rate_published_threshold": after["success_rate_published_threshold"],
        "clean_success_rate": before["success_rate"],
        "clean_success_rate_published_threshold": before["success_rate_published_threshold"],
        "clean_success_rate_identification": before["success_rate_identification"],
        "distance_before": before["distance"],
        "distance_after": after["distance"],
        "patch_area_percent": area_percent(mask),
        "tv": float(total_variation(patch.to(device), mask)),
        "nps": float(non_printability_score(patch.to(device), mask)),
        **paired,
        "random_patch": {
            "seed": int(seed if baseline_seed is None else baseline_seed),
            "success_rate": rand["success_rate"],
            "success_rate_identification": rand["success_rate_identification"],
            "success_rate_published_threshold": rand["success_rate_published_threshold"],
            "distance_after": rand["distance"],
            "tv": float(total_variation(random_patch, mask)),
            "nps": float(non_printability_score(random_patch, mask)),
        },
    }
