"""A face study: every attacker's dodging patch and impersonation patches, judged honestly.

Why this shape: a physical attacker optimises a patch on photos of themselves, then wears it in front
of a camera (another photo) and is compared with a template the recognizer enrolled from yet another
photo. So each patch is optimised on the attacker's optimisation photos toward (or away from) the
templates of the identities' optimisation photos, and judged twice on held-out physical draws
(a generator the optimisation never used):

* in sample (``held_out: transforms_only``): on the photos it was optimised on, against the
  templates it was optimised toward: how well the optimisation did;
* on held-out photos (``held_out: photos``, where the attacker has a photo the optimisation never
  saw: :mod:`robustcnn.face.splits`): each evaluation photo cropped by its own alignment, against
  the enrolled templates; for impersonation only when the target's template also comes from photos
  the optimisation never saw.

Every figure sits next to its random patch (same mask, the patch's own seed) and the bare face on the
same draws, and each patch says whether it beats its baseline (``beats_baseline``, a paired exact
test); the study check ``patches_beat_random_baseline`` fails when one does not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any  # Any: the JSON-able metrics and evaluations

import numpy as np
import torch
from torch import Tensor

from robustcnn.errors import ConfigError
from robustcnn.face.attack import attack_face
from robustcnn.face.baselines import baseline_check
from robustcnn.face.enrolment import Enrolment, templates
from robustcnn.face.evaluation import evaluate_patch
from robustcnn.face.masks import area_percent, check_mask
from robustcnn.face.patch import PatchResult, PatchSettings
from robustcnn.face.saliency import FaceSaliency, patch_saliency
from robustcnn.face.splits import HELD_OUT_PHOTOS, HELD_OUT_TRANSFORMS, impersonation_held_out
from robustcnn.face.transfer import HeldOutRecognizer, TransferJudge, transfer_metrics, transfer_summary
from robustcnn.face.transforms import PhysicalVariation, apply_patch, image_size
from robustcnn.models.face.recognizer import FaceRecognizer

log = logging.getLogger(__name__)

#: The two evaluations of every patch: key in its record, and what the optimisation never saw.
EVALUATIONS = (("in_sample", HELD_OUT_TRANSFORMS), ("held_out_photos", HELD_OUT_PHOTOS))


@dataclass
class FaceStudyResult:
    """JSON-able ``metrics`` plus the tensors for artifacts (kept out of the JSON).

    ``patches`` / ``adversarial_faces`` / ``clean_faces``: [3, H, W] on the CPU, keyed
    ``dodging/<name>`` and ``impersonation/<attacker>__<target>``; a face is the digital composite on
    the attacker's first held-out photo (else the first photo it was optimised on), next to that
    photo without the patch. ``saliency``: the recognizer's saliency on both
    (:mod:`robustcnn.face.saliency`), under the same keys.
    """

    metrics: dict[str, Any]
    patches: dict[str, Tensor] = field(default_factory=dict)
    adversarial_faces: dict[str, Tensor] = field(default_factory=dict)
    clean_faces: dict[str, Tensor] = field(default_factory=dict)
    saliency: dict[str, FaceSaliency] = field(default_factory=dict)


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _check_study(enrolment: Enrolment, attackers: list[int], targets: list[int]) -> None:
    """Every attacker and target an identity of the enrolment, at least one attacker."""
    names = enrolment.names
    if enrolment.images.shape[0] != len(names):
        raise ConfigError(f"{enrolment.images.shape[0]} enrolment photos for {len(names)} identity names")
    for i in [*attackers, *targets]:
        if not 0 <= int(i) < len(names):
            raise ConfigError(f"identity index {i} is not in the gallery of {len(names)} identities")
    if not attackers:
        raise ConfigError("a face study needs at least one attacker (an identity index)")


@dataclass(frozen=True)
class _StudySetup:
    """What every patch of one study shares: who is enrolled, the mask, how patches are made and judged."""

    recognizer: FaceRecognizer
    enrolment: Enrolment
    enrolled: Tensor  # [G, D] the enrolled templates (the recognizer's gallery)
    known: Tensor  # [G, D] templates of each identity's optimisation photos (what the attacker aims at)
    mask: Tensor
    settings: PatchSettings
    variation: PhysicalVariation  # of the held-out evaluation
    eval_draws: int
    seed: int  # of the evaluation draws
    eval_batch_size: int
    transfer: TransferJudge | None = None  # the held-out recognizers, if any
    ensemble: tuple[tuple[FaceRecognizer, Tensor], ...] = ()  # more optimised-against recognizers, known


def _transfer_text(record: dict[str, Any]) -> str:
    """'; transfer: faceres 0.250 (random 0.000), ...' or nothing without held-out recognizers."""
    parts = [
        f"{name} {e['success_rate']:.3f} (random {e['random_patch_success_rate']:.3f})"
        for name, e in record["transfer"].items()
    ]
    return f"; transfer: {', '.join(parts)}" if parts else ""


def _log_patch(job: int, record: dict[str, Any]) -> None:
    """One line per patch, so a long study shows progress and each figure next to its baseline."""
    held = record["held_out_photos"]
    log.info(
        "patch %d: %s %s%s: %d steps in %.1f s; in sample %.3f (random %.3f); held-out photos %s%s",
        job,
        record["goal"],
        record["attacker"],
        "" if record["target"] is None else f" as {record['target']}",
        record["steps"],
        record["seconds"],
        record["in_sample"]["success_rate"],
        record["in_sample"]["random_patch"]["success_rate"],
        "none"
        if held is None
        else f"{held['success_rate']:.3f} (random {held['random_patch']['success_rate']:.3f})",
        _transfer_text(record),
    )


def _evaluate(
    setup: _StudySetup, faces: Tensor, patch: Tensor, gallery: Tensor, a: int, t: int | None,
    baseline_seed: int, held_out: str,
) -> dict[str, Any]:  # fmt: skip
    return evaluate_patch(
        setup.recognizer, faces.to(setup.mask.device), patch, setup.mask, gallery, a, t, setup.variation,
        setup.eval_draws, setup.seed, setup.eval_batch_size, baseline_seed=baseline_seed, held_out=held_out,
    )  # fmt: skip


def _judge(setup: _StudySetup, patch: Tensor, a: int, t: int | None, baseline_seed: int) -> dict[str, Any]:
    """Both evaluations of one patch: in sample (its optimisation photos, the templates it aimed at),
    and on held-out photos against the enrolled templates, where the split allows it."""
    enrolment = setup.enrolment
    opt_faces = enrolment.optimisation_faces(a)
    in_sample = _evaluate(setup, opt_faces, patch, setup.known, a, t, baseline_seed, HELD_OUT_TRANSFORMS)
    faces = enrolment.evaluation_faces(a)
    label = HELD_OUT_PHOTOS if t is None else impersonation_held_out(enrolment.splits[a], enrolment.splits[t])
    held = None
    if faces is not None and label == HELD_OUT_PHOTOS:
        held = _evaluate(setup, faces, patch, setup.enrolled, a, t, baseline_seed, HELD_OUT_PHOTOS)
    return {"in_sample": in_sample, "held_out_photos": held}


def _patch(setup: _StudySetup, job: int, a: int, t: int | None) -> tuple[PatchResult, dict[str, Any]]:
    """Patch number ``job``: optimised with seed ``settings.seed + job`` on the attacker's optimisation
    photos; its random baseline gets the same number as its own seed. The record's headline figure
    (``held_out``, ``success_rate``, ``beats_baseline``) is the held-out-photo one where it exists."""
    settings = replace(setup.settings, seed=setup.settings.seed + job)
    names = setup.enrolment.names
    faces = setup.enrolment.optimisation_faces(a).to(setup.mask.device)
    found = attack_face(
        setup.recognizer, faces, setup.known, a, t, setup.mask, settings, ensemble=setup.ensemble
    )
    judged = _judge(setup, found.patch, a, t, baseline_seed=settings.seed)
    transfer = setup.transfer.judge(found.patch, a, t, settings.seed) if setup.transfer else {}
    headline = judged["held_out_photos"] or judged["in_sample"]
    record: dict[str, Any] = {
        "goal": "dodging" if t is None else "impersonation",
        "attacker": names[a],
        "target": None if t is None else names[t],
        "held_out": headline["held_out"],
        "success_rate": headline["success_rate"],
        "random_patch_success_rate": headline["random_patch"]["success_rate"],
        "clean_success_rate": headline["clean_success_rate"],
        "beats_baseline": headline["beats_baseline"],
        "p_value": headline["p_value"],
        "optimisation_seed": settings.seed,
        "baseline_seed": settings.seed,
        **judged,
        "transfer": transfer,
        "steps": found.steps,
        "seconds": found.seconds,
        "ms_per_step": found.ms_per_step,
        "final_loss": found.history[-1],
        "train_success_rate": found.success_history[-1] if found.success_history else None,
    }
    _log_patch(job + 1, record)
    return found, record


def _keep_patch(
    result: FaceStudyResult, setup: _StudySetup, key: str, found: PatchResult, a: int, t: int | None
) -> dict[str, Any]:
    """The patch and its digital composite on the attacker's first held-out photo (else the first photo
    it was optimised on), next to that photo without it, on the CPU, for the artifacts; and the
    recognizer's saliency on both, toward the enrolled template of the attacker (dodging) or the
    target (impersonation). Returns what the patch's record keeps of the saliency."""
    held = setup.enrolment.evaluation_faces(a)
    photo = (held if held is not None else setup.enrolment.optimisation_faces(a))[:1].to(setup.mask.device)
    result.patches[key] = found.patch.cpu()
    face = apply_patch(photo, found.patch, setup.mask, None, setup.variation)[0].detach()
    result.adversarial_faces[key] = face.cpu()
    result.clean_faces[key] = photo[0].detach().cpu()
    whose = a if t is None else t
    found_saliency = patch_saliency(
        setup.recognizer, photo[0], face, setup.enrolled[whose], setup.mask, setup.enrolment.names[whose]
    )
    result.saliency[key] = found_saliency
    return {**found_saliency.summary(), "photo": "held-out" if held is not None else "optimisation"}


def _figure_keys(goal: str, kind: str, records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The flat results keys of one goal and evaluation kind (MLflow metrics, older readers)."""
    suffix = "" if kind == "in_sample" else "_held_out_photos"
    evaluations = [r[kind] for r in records if r["goal"] == goal and r[kind] is not None]
    keys: dict[str, float | None] = {}
    for rule in ("", "_identification", "_published_threshold"):
        keys[f"{goal}_success_rate{rule}{suffix}"] = _mean([e[f"success_rate{rule}"] for e in evaluations])
        keys[f"random_{goal}_success_rate{rule}{suffix}"] = _mean(
            [e["random_patch"][f"success_rate{rule}"] for e in evaluations]
        )
        keys[f"clean_{goal}_success_rate{rule}{suffix}"] = _mean(
            [e[f"clean_success_rate{rule}"] for e in evaluations]
        )
    return keys


def _saliency_keys(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per goal, the mean share of the recognizer's saliency inside the patch, clean vs patched."""
    keys: dict[str, float | None] = {}
    for goal in ("dodging", "impersonation"):
        found = [r["saliency"] for r in records if r["goal"] == goal and r.get("saliency")]
        for face in ("clean", "patched"):
            shares = [f[f"{face}_mass_in_patch"] for f in found if f[f"{face}_mass_in_patch"] is not None]
            keys[f"{goal}_saliency_in_patch_{face}"] = _mean(shares)
    return keys


def _figures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per goal and evaluation kind that has a patch: what was held out, the success rate and
    its baselines (random patch, no patch) at the calibrated threshold, and how many patches beat it."""
    rows: list[dict[str, Any]] = []
    for goal in ("dodging", "impersonation"):
        for kind, held_out in EVALUATIONS:
            evaluations = [r[kind] for r in records if r["goal"] == goal and r[kind] is not None]
            if not evaluations:
                continue
            rows.append({
                "goal": goal,
                "held_out": held_out,
                "photos": "optimisation" if kind == "in_sample" else "held-out",
                "patches": len(evaluations),
                "success_rate": _mean([e["success_rate"] for e in evaluations]),
                "success_rate_identification": _mean([e["success_rate_identification"] for e in evaluations]),
                "random_patch_success_rate": _mean([e["random_patch"]["success_rate"] for e in evaluations]),
                "clean_success_rate": _mean([e["clean_success_rate"] for e in evaluations]),
                "beat_baseline": sum(bool(e["beats_baseline"]) for e in evaluations),
                "n_evaluations": sum(int(e["n_evaluations"]) for e in evaluations),
            })  # fmt: skip
    return rows


def _matrix(records: list[dict[str, Any]], attackers: list[str], targets: list[str]) -> dict[str, Any]:
    """The attacker x target impersonation matrix of the in-sample figures (None on the diagonal)."""
    cells = {(r["attacker"], r["target"]): r["in_sample"] for r in records if r["goal"] == "impersonation"}

    def grid(key: str) -> list[list[float | None]]:
        return [[cells[(a, t)][key] if (a, t) in cells else None for t in targets] for a in attackers]

    return {
        "attackers": attackers,
        "targets": targets,
        "held_out": HELD_OUT_TRANSFORMS,
        "success_rate": grid("success_rate"),
        "success_rate_identification": grid("success_rate_identification"),
    }


def _study_metrics(
    setup: _StudySetup,
    records: list[dict[str, Any]],
    attackers: list[int],
    targets: list[int],
    seconds: float,
) -> dict[str, Any]:
    """The JSON-able results: the figures (each with what was held out and its baselines), the flat
    keys of the same means, every patch, the check that each beats its baseline, and the settings."""
    metrics: dict[str, Any] = {}
    for goal in ("dodging", "impersonation"):
        for kind, _ in EVALUATIONS:
            metrics.update(_figure_keys(goal, kind, records))
    metrics["random_patch_success_rate"] = metrics["random_dodging_success_rate"]
    metrics["random_patch_success_rate_identification"] = metrics[
        "random_dodging_success_rate_identification"
    ]
    names = setup.enrolment.names
    held_out = {key: HELD_OUT_PHOTOS if key.endswith("_held_out_photos") else HELD_OUT_TRANSFORMS
                for key in metrics}  # fmt: skip
    transfer = transfer_summary(setup.transfer.holdouts if setup.transfer else [], records)
    transfer_keys, transfer_held_out = transfer_metrics(transfer)
    metrics.update(transfer_keys)
    metrics.update(
        transfer=transfer,
        held_out=dict(sorted({**held_out, **transfer_held_out}.items())),
        figures=_figures(records),
        patches=records,
        checks=[baseline_check(records)],
        impersonation_matrix=_matrix(records, [names[a] for a in attackers], [names[t] for t in targets]),
        photo_split=setup.enrolment.record(),
        threshold=setup.recognizer.threshold,
        recognizer=setup.recognizer.name,
        ensemble=[{"recognizer": r.name, "threshold": r.threshold}
                  for r in (setup.recognizer, *(member for member, _ in setup.ensemble))],  # fmt: skip
        n_identities=len(names),
        eval_draws=int(setup.eval_draws),
        eval_seed=int(setup.seed),
        mask_area_percent=area_percent(setup.mask),
        settings=setup.settings.to_dict(),
        eval_variation=setup.variation.to_dict(),
        ms_per_step=_mean([r["ms_per_step"] for r in records]),
        seconds=seconds,
    )  # fmt: skip
    metrics.update(_saliency_keys(records))  # after held_out: a share of saliency is not a success rate
    return metrics


def run_face_study(
    recognizer: FaceRecognizer,
    enrolment: Enrolment,
    attackers: list[int],
    targets: list[int],
    mask: Tensor,
    settings: PatchSettings | None = None,
    variation: PhysicalVariation | None = None,
    eval_draws: int = 64,
    seed: int = 0,
    eval_batch_size: int = 64,
    holdouts: list[HeldOutRecognizer] | None = None,
    ensemble: Sequence[FaceRecognizer] = (),
) -> FaceStudyResult:
    """Dodging for every attacker, impersonation for every attacker x target (target != attacker).

    ``enrolment`` (:func:`~robustcnn.face.enrolment.enrol`): the identities, their photos and the
    split of each person's photos into enrolment, optimisation and evaluation. ``settings.variation``
    drives the optimisation, ``variation`` (default: the same) the held-out evaluation. Optimisation
    seeds are ``settings.seed + job`` (the patch's random baseline gets the same number); evaluation
    draws come from ``seed`` (generator "evaluate") and are the same for every patch, its clean face
    and its random baseline. ``eval_batch_size``: composites per forward pass in the evaluation.
    ``holdouts`` (:func:`~robustcnn.face.transfer.prepare_holdouts`): recognizers every patch is also
    judged on, on the same draws (results.json ``transfer``), never optimised against. ``ensemble``:
    more recognizers (thresholds set) every patch is optimised against besides ``recognizer``, each
    toward its own templates of the attacker-known photos; the study's own figures stay ``recognizer``'s.
    """
    settings = settings or PatchSettings()
    variation = variation if variation is not None else settings.variation
    _check_study(enrolment, attackers, targets)
    device = mask.device
    mask = check_mask(mask, image_size(enrolment.images))
    start = time.perf_counter()
    enrolled, known = templates(recognizer, enrolment, device)
    transfer = None
    if holdouts:
        transfer = TransferJudge(holdouts, enrolment, mask, variation, eval_draws, seed, eval_batch_size)
    members = tuple((member, templates(member, enrolment, device)[1]) for member in ensemble)
    setup = _StudySetup(
        recognizer, enrolment, enrolled, known, mask, settings, variation, eval_draws, seed, eval_batch_size,
        transfer, members,
    )  # fmt: skip
    result = FaceStudyResult(metrics={})
    records: list[dict[str, Any]] = []
    for a in attackers:
        for t in [None, *(t for t in targets if t != a)]:
            found, record = _patch(setup, len(records), a, t)
            records.append(record)
            name = enrolment.names[a]
            key = f"dodging/{name}" if t is None else f"impersonation/{name}__{enrolment.names[t]}"
            record["saliency"] = _keep_patch(result, setup, key, found, a, t)
    result.metrics = _study_metrics(setup, records, attackers, targets, time.perf_counter() - start)
    failed = [c for c in result.metrics["checks"] if c["passed"] is False]
    for check in failed:
        log.warning("face study check %s FAILED: %s", check["name"], check["detail"])
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
