"""Physical patch attacks on face recognition: dodging and impersonation, and their honest evaluation.

Why these losses: a recognizer decides by descriptor distances, under two rules at once, verification
(distance to a claimed identity below ``threshold``) and closed-set identification (nearest gallery
entry). Dodging pushes the descriptor away from the attacker's own gallery descriptor and, with a
margin term, behind the nearest other identity; impersonation pulls it toward the target's
descriptor and, with a margin term, ahead of every other identity (the attacker included). Distances
are divided by the threshold, so loss weights (TV, NPS) mean the same on every embedder.

Why held-out draws: a patch optimised under EOT is measured on draws from a different generator
(:func:`robustcnn.face.transforms.draw_generator`), next to the same face without a patch
and with a random patch of the same mask (the baseline every attack must beat), on the same draws.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any  # Any: the JSON-able metrics and evaluations

import numpy as np
import torch
from torch import Tensor

from robustcnn.errors import ConfigError
from robustcnn.face.masks import area_percent, check_mask
from robustcnn.face.patch import LossFn, ModelLoss, PatchResult, PatchSettings, frozen_modules, optimise_patch
from robustcnn.face.printability import non_printability_score, total_variation
from robustcnn.face.transforms import Draws, PhysicalVariation, apply_patch, draw_generator, image_size
from robustcnn.models.face.recognizer import DEFAULT_THRESHOLD, FaceRecognizer

log = logging.getLogger(__name__)

#: Margin of the rank terms, as a fraction of the verification threshold.
RANK_MARGIN = 0.1
#: Dodging stops pushing the own distance beyond this many thresholds.
DODGING_CAP = 2.0


def _distances(descriptors: Tensor, gallery: Tensor) -> Tensor:
    """Euclidean distances [n, G] with a smooth square root (finite gradient at distance 0, which a
    dodging attack starts from when the attacker's photo is also the gallery photo)."""
    return ((descriptors[:, None, :] - gallery[None, :, :]).pow(2).sum(-1) + 1e-12).sqrt()


def _nearest_other(d: Tensor, index: int) -> Tensor | None:
    """Distance [n] to the nearest gallery entry other than ``index`` (None for a 1-entry gallery)."""
    if d.shape[1] < 2:
        return None
    blocked = torch.zeros_like(d)
    blocked[:, index] = float("inf")
    return (d + blocked).min(1).values


def dodging_loss(recognizer: FaceRecognizer, gallery: Tensor, attacker_index: int) -> LossFn:
    """Loss to minimise: -min(d(own), 2 thr) + relu(d(nearest other) - d(own) + margin), in threshold units.

    The first term leaves the own identity's verification ball (capped at twice the threshold: a
    descriptor pushed off to infinity is near nobody, which would fight the rank term); the second
    brings another identity nearer than the attacker's own. Success (for early stopping): rejected by
    verification AND someone else is nearest.
    """
    thr = recognizer.threshold

    def loss(x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        d = _distances(recognizer.embed(x_adv).float(), gallery)
        own = d[:, attacker_index]
        value = -own.clamp(max=DODGING_CAP * thr) / thr
        other = _nearest_other(d, attacker_index)
        if other is not None:
            value = value + torch.relu(other - own + RANK_MARGIN * thr) / thr
        success = (own >= thr) & (d.argmin(1) != attacker_index)
        return value, success

    return ModelLoss(loss, (recognizer.embedder,))


def impersonation_loss(recognizer: FaceRecognizer, gallery: Tensor, target_index: int) -> LossFn:
    """Loss to minimise: d(target) + relu(d(target) - d(nearest other) + margin), in threshold units.

    Success (for early stopping): accepted as the target AND the target is nearest.
    """
    thr = recognizer.threshold

    def loss(x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        d = _distances(recognizer.embed(x_adv).float(), gallery)
        to_target = d[:, target_index]
        value = to_target / thr
        other = _nearest_other(d, target_index)
        if other is not None:
            value = value + torch.relu(to_target - other + RANK_MARGIN * thr) / thr
        success = (to_target < thr) & (d.argmin(1) == target_index)
        return value, success

    return ModelLoss(loss, (recognizer.embedder,))


def _check_indices(gallery: Tensor, attacker_index: int, target_index: int | None) -> None:
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


def attack_face(
    recognizer: FaceRecognizer,
    attacker_faces: Tensor,
    gallery_descriptors: Tensor,
    attacker_index: int,
    target_index: int | None,
    mask: Tensor,
    settings: PatchSettings | None = None,
    init: str | Tensor = "random",
) -> PatchResult:
    """One patch for the attacker's photos [K, 3, H, W]: dodging (``target_index`` None) or
    impersonation of ``target_index``; ``gallery_descriptors`` [G, D], one per identity."""
    _check_indices(gallery_descriptors, attacker_index, target_index)
    gallery = gallery_descriptors.detach().float().to(attacker_faces.device)
    if target_index is None:
        loss = dodging_loss(recognizer, gallery, attacker_index)
    else:
        loss = impersonation_loss(recognizer, gallery, target_index)
    return optimise_patch(loss, attacker_faces, mask, settings, init, modules=[recognizer.embedder])


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
    attacker_index: int,
    target_index: int | None,
    batch_size: int,
) -> dict[str, Tensor]:
    """Every face under every draw: distance to the reference (own / target) and the nearest entry."""
    k, n = faces.shape[0], len(draws)
    face_idx = torch.arange(k, device=faces.device).repeat_interleave(n)
    draw_idx = torch.arange(n, device=faces.device).repeat(k)
    reference = attacker_index if target_index is None else target_index
    dist, nearest = [], []
    for begin in range(0, k * n, batch_size):
        fi, di = face_idx[begin : begin + batch_size], draw_idx[begin : begin + batch_size]
        x = apply_patch(faces.index_select(0, fi), patch, mask, draws.select(di), variation)
        d = _distances(recognizer.embed(x).float(), gallery)
        dist.append(d[:, reference])
        nearest.append(d.argmin(1))
    return {"distance": torch.cat(dist), "nearest": torch.cat(nearest)}


def _rates(
    out: dict[str, Tensor], threshold: float, attacker_index: int, target_index: int | None
) -> dict[str, float]:
    def verified(at: float) -> Tensor:
        return out["distance"] >= at if target_index is None else out["distance"] < at

    if target_index is None:
        identified = out["nearest"] != attacker_index
    else:
        identified = out["nearest"] == target_index
    return {
        "success_rate": float(verified(threshold).float().mean()),
        "success_rate_identification": float(identified.float().mean()),
        # the same draws judged at face-api's published threshold, for comparison with other reports
        "success_rate_published_threshold": float(verified(DEFAULT_THRESHOLD).float().mean()),
        "distance": float(out["distance"].mean()),
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
) -> dict[str, Any]:
    """Success of ``patch`` on HELD-OUT draws (generator "evaluate", ``seed``), every face x every draw.

    Verification: dodging succeeds when the distance to the attacker's own descriptor is >= threshold,
    impersonation when the distance to the target's is < threshold; identification: the nearest
    gallery entry is not the attacker / is the target. Reported next to the same faces without a
    patch (``clean_*``) and with :func:`random_patch_baseline` (``random_patch``), on the same draws.
    """
    _check_indices(gallery_descriptors, attacker_index, target_index)
    variation = variation if variation is not None else PhysicalVariation.identity()
    device = faces.device
    mask = check_mask(mask, image_size(faces)).to(device)
    gallery = gallery_descriptors.detach().float().to(device)
    draws = variation.sample(n_draws, draw_generator(seed, "evaluate", device), image_size(faces), 1)
    args = (variation, gallery, attacker_index, target_index, batch_size)
    random_patch = random_patch_baseline(mask, seed)
    with frozen_modules([recognizer.embedder]):
        attacked = _outcomes(recognizer, faces, patch.to(device), mask, draws, *args)
        clean = _outcomes(
            recognizer, faces, torch.zeros_like(random_patch), torch.zeros_like(mask), draws, *args
        )
        noisy = _outcomes(recognizer, faces, random_patch, mask, draws, *args)
    thr = recognizer.threshold
    after, before, rand = (_rates(o, thr, attacker_index, target_index) for o in (attacked, clean, noisy))
    return {
        "goal": "dodging" if target_index is None else "impersonation",
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
        "random_patch": {
            "success_rate": rand["success_rate"],
            "success_rate_identification": rand["success_rate_identification"],
            "success_rate_published_threshold": rand["success_rate_published_threshold"],
            "distance_after": rand["distance"],
            "tv": float(total_variation(random_patch, mask)),
            "nps": float(non_printability_score(random_patch, mask)),
        },
    }


@dataclass
class FaceStudyResult:
    """JSON-able ``metrics`` plus the tensors for artifacts (kept out of the JSON).

    ``patches`` / ``adversarial_faces``: [3, H, W] on the CPU, keyed ``dodging/<name>`` and
    ``impersonation/<attacker>__<target>``; a face is the digital composite on the attacker's first photo.
    """

    metrics: dict[str, Any]
    patches: dict[str, Tensor] = field(default_factory=dict)
    adversarial_faces: dict[str, Tensor] = field(default_factory=dict)


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _check_study(
    gallery_faces: Tensor, identities: list[str], attackers: list[int], targets: list[int]
) -> None:
    """One photo per name, every attacker and target an identity of the gallery, at least one attacker."""
    if gallery_faces.shape[0] != len(identities):
        raise ConfigError(f"{gallery_faces.shape[0]} gallery photos for {len(identities)} identity names")
    for i in [*attackers, *targets]:
        if not 0 <= int(i) < len(identities):
            raise ConfigError(f"identity index {i} is not in the gallery of {len(identities)} identities")
    if not attackers:
        raise ConfigError("a face study needs at least one attacker (an identity index)")


@dataclass(frozen=True)
class _StudySetup:
    """What every patch of one study shares: who is enrolled, the mask, how patches are made and judged."""

    recognizer: FaceRecognizer
    identities: list[str]
    gallery: Tensor  # [G, D] enrolled descriptors, one per identity
    mask: Tensor
    settings: PatchSettings
    variation: PhysicalVariation  # of the held-out evaluation
    eval_draws: int
    seed: int  # of the evaluation draws
    eval_batch_size: int


@dataclass
class _Tally:
    """What the study accumulates patch by patch; the metrics are computed from it at the end.

    Why one place: the headline rates are means over every patch of a goal, the matrix and the
    per-attacker entries are per patch, and the optimisation seed is the number of patches so far.
    """

    patches: int = 0
    rates: dict[str, list[float]] = field(default_factory=dict)
    step_ms: list[float] = field(default_factory=list)
    per_attacker: list[dict[str, Any]] = field(default_factory=list)
    matrix: list[list[float | None]] = field(default_factory=list)
    matrix_id: list[list[float | None]] = field(default_factory=list)

    def add(self, goal: str, found: PatchResult, evaluation: dict[str, Any]) -> None:
        """Count one patch of ``goal`` (dodging / impersonation): its speed and its rates."""
        self.patches += 1
        self.step_ms.append(found.ms_per_step)
        random_patch = evaluation["random_patch"]
        for key, value in (
            (f"{goal}_success_rate", evaluation["success_rate"]),
            (f"{goal}_success_rate_identification", evaluation["success_rate_identification"]),
            (f"{goal}_success_rate_published_threshold", evaluation["success_rate_published_threshold"]),
            (
                f"random_{goal}_success_rate_published_threshold",
                random_patch["success_rate_published_threshold"],
            ),
            (f"clean_{goal}_success_rate", evaluation["clean_success_rate"]),
            (f"clean_{goal}_success_rate_identification", evaluation["clean_success_rate_identification"]),
            (f"random_{goal}_success_rate", random_patch["success_rate"]),
            (f"random_{goal}_success_rate_identification", random_patch["success_rate_identification"]),
        ):
            self.rates.setdefault(key, []).append(value)


def _log_patch(
    job: int, identities: list[str], a: int, t: int | None, found: PatchResult, evaluation: dict[str, Any]
) -> None:
    """One line per patch, so a long study shows progress and the held-out rate next to both baselines."""
    log.info(
        "patch %d: %s %s%s: %d steps in %.1f s, held-out success %.3f (no patch %.3f, random patch %.3f)",
        job,
        "dodging" if t is None else "impersonation",
        identities[a],
        "" if t is None else f" as {identities[t]}",
        found.steps,
        found.seconds,
        evaluation["success_rate"],
        evaluation["clean_success_rate"],
        evaluation["random_patch"]["success_rate"],
    )


def _attack_and_evaluate(
    setup: _StudySetup, job: int, a: int, t: int | None, faces: Tensor
) -> tuple[PatchResult, dict[str, Any]]:
    """Patch number ``job`` (optimised with seed ``settings.seed + job``), judged on held-out draws.

    The evaluation gets how the patch was found (steps, time, final loss, training success) added.
    """
    settings = replace(setup.settings, seed=setup.settings.seed + job)
    found = attack_face(setup.recognizer, faces, setup.gallery, a, t, setup.mask, settings)
    evaluation = evaluate_patch(
        setup.recognizer,
        faces,
        found.patch,
        setup.mask,
        setup.gallery,
        a,
        t,
        setup.variation,
        setup.eval_draws,
        setup.seed,
        setup.eval_batch_size,
    )
    _log_patch(job + 1, setup.identities, a, t, found, evaluation)
    evaluation.update(
        steps=found.steps,
        seconds=found.seconds,
        ms_per_step=found.ms_per_step,
        final_loss=found.history[-1],
        train_success_rate=found.success_history[-1] if found.success_history else None,
    )
    return found, evaluation


def _keep_patch(
    result: FaceStudyResult, key: str, found: PatchResult, faces: Tensor, setup: _StudySetup
) -> None:
    """The patch and its digital composite on the attacker's first photo, on the CPU, for the artifacts."""
    result.patches[key] = found.patch.cpu()
    face = apply_patch(faces[:1], found.patch, setup.mask, None, setup.variation)[0]
    result.adversarial_faces[key] = face.detach().cpu()


def _attacker_photos(a: int, gallery_faces: Tensor, probe_faces: dict[int, Tensor] | None) -> Tensor:
    """The photos attacker ``a`` wears its patch on: its probes when it has any, else its enrolment photo."""
    faces = probe_faces[a] if probe_faces is not None and a in probe_faces else gallery_faces[a : a + 1]
    return faces.to(gallery_faces.device)


def _attack_identity(
    setup: _StudySetup, tally: _Tally, result: FaceStudyResult, a: int, faces: Tensor, targets: list[int]
) -> None:
    """Attacker ``a``'s dodging patch, then one impersonation patch per target other than ``a``."""
    name = setup.identities[a]
    found, dodging = _attack_and_evaluate(setup, tally.patches, a, None, faces)
    tally.add("dodging", found, dodging)
    _keep_patch(result, f"dodging/{name}", found, faces, setup)
    entry: dict[str, Any] = {"attacker": name, "index": a, "dodging": dodging, "impersonation": {}}
    row: list[float | None] = [None] * len(targets)
    row_id: list[float | None] = [None] * len(targets)
    for col, t in enumerate(targets):
        if t == a:
            continue
        found, imp = _attack_and_evaluate(setup, tally.patches, a, t, faces)
        tally.add("impersonation", found, imp)
        row[col], row_id[col] = imp["success_rate"], imp["success_rate_identification"]
        _keep_patch(result, f"impersonation/{name}__{setup.identities[t]}", found, faces, setup)
        entry["impersonation"][setup.identities[t]] = imp
    tally.per_attacker.append(entry)
    tally.matrix.append(row)
    tally.matrix_id.append(row_id)


def _study_metrics(
    setup: _StudySetup, tally: _Tally, attackers: list[int], targets: list[int], seconds: float
) -> dict[str, Any]:
    """The JSON-able results: mean rates per goal (None where a goal had no patch), the random-patch
    headline (dodging, the easier goal), the impersonation matrix, every patch, and the settings."""
    metrics: dict[str, Any] = {key: _mean(values) for key, values in sorted(tally.rates.items())}
    for goal in ("dodging", "impersonation"):
        metrics.setdefault(f"{goal}_success_rate", None)
        metrics.setdefault(f"{goal}_success_rate_identification", None)
    metrics["random_patch_success_rate"] = metrics.get("random_dodging_success_rate")
    metrics["random_patch_success_rate_identification"] = metrics.get(
        "random_dodging_success_rate_identification"
    )
    identities = setup.identities
    metrics.update(
        impersonation_matrix={
            "attackers": [identities[a] for a in attackers],
            "targets": [identities[t] for t in targets],
            "success_rate": tally.matrix,
            "success_rate_identification": tally.matrix_id,
        },
        per_attacker=tally.per_attacker,
        threshold=setup.recognizer.threshold,
        recognizer=setup.recognizer.name,
        n_identities=len(identities),
        eval_draws=int(setup.eval_draws),
        eval_seed=int(setup.seed),
        mask_area_percent=area_percent(setup.mask),
        settings=setup.settings.to_dict(),
        eval_variation=setup.variation.to_dict(),
        ms_per_step=_mean(tally.step_ms),
        seconds=seconds,
    )
    return metrics


def run_face_study(
    recognizer: FaceRecognizer,
    gallery_faces: Tensor,
    identities: list[str],
    attackers: list[int],
    targets: list[int],
    mask: Tensor,
    settings: PatchSettings | None = None,
    variation: PhysicalVariation | None = None,
    eval_draws: int = 64,
    seed: int = 0,
    probe_faces: dict[int, Tensor] | None = None,
    eval_batch_size: int = 64,
) -> FaceStudyResult:
    """Dodging for every attacker, impersonation for every attacker x target (target != attacker).

    ``gallery_faces`` [G, 3, H, W]: one enrolment photo per identity (``identities``: their names).
    The attacker's photos are ``probe_faces[a]`` [K, 3, H, W] when given (better: other photos than
    the enrolled one), else the enrolment photo itself. ``settings.variation`` drives the
    optimisation, ``variation`` (default: the same) the held-out evaluation. Optimisation seeds are
    ``settings.seed + job``; evaluation draws come from ``seed`` (generator "evaluate") and are the
    same for every patch, its clean and its random baseline. Rates are means over attackers (dodging)
    or attacker-target pairs (impersonation), under the verification rule and, as ``*_identification``,
    the identification rule. ``eval_batch_size``: composites per forward pass in the evaluation.
    """
    settings = settings or PatchSettings()
    variation = variation if variation is not None else settings.variation
    _check_study(gallery_faces, identities, attackers, targets)
    mask = check_mask(mask, image_size(gallery_faces)).to(gallery_faces.device)
    start = time.perf_counter()
    with frozen_modules([recognizer.embedder]):
        gallery = recognizer.embed_batched(gallery_faces).float()
    setup = _StudySetup(
        recognizer, identities, gallery, mask, settings, variation, eval_draws, seed, eval_batch_size
    )
    result = FaceStudyResult(metrics={})
    tally = _Tally()
    for a in attackers:
        _attack_identity(setup, tally, result, a, _attacker_photos(a, gallery_faces, probe_faces), targets)
    result.metrics = _study_metrics(setup, tally, attackers, targets, time.perf_counter() - start)
    return result


def patch_to_image(patch: Tensor, mask: Tensor, transparent: bool = False) -> np.ndarray:
    """The patch as it would be printed: uint8 [H, W, 3] on white, or [H, W, 4] with alpha = mask."""
    p = patch.detach().float().cpu().reshape(3, *patch.shape[-2:]).clamp(0.0, 1.0)
    m = (mask.detach().float().cpu().reshape(1, *mask.shape[-2:]) > 0.5).float()
    if transparent:
        rgba = torch.cat([p * m + (1.0 - m), m], 0)
    else:
        rgba = p * m + (1.0 - m)
    return (rgba.permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
