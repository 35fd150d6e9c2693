"""The verification threshold a face study attacks, and what it rests on.

Why calibrate: face-api's published 0.6 accepts many impostor pairs on tight crops, so a patch
would "succeed" against a recognizer nobody would deploy. The study sets the threshold at a target
false-accept rate on impostor pairs of people who take no part in the attack, measures its
false-accept rate on the other pairs (with an exact binomial interval), and reports both thresholds'
error rates, with the genuine (same-person) distances and where those came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any  # Any: the data section (config) and the JSON report

import torch

from robustcnn.errors import ConfigError
from robustcnn.face.baselines import clopper_pearson
from robustcnn.face.gallery import FaceGallery, genuine_jitter_pairs
from robustcnn.models.face.recognizer import (
    DEFAULT_THRESHOLD,
    Calibration,
    FaceRecognizer,
    calibrate_threshold,
)


def _embed(recognizer: FaceRecognizer, images: torch.Tensor) -> torch.Tensor:
    """Descriptors of ``images`` computed where the recognizer's weights are (a GPU job's included)."""
    device = next((p.device for p in recognizer.embedder.parameters()), torch.device("cpu"))
    return recognizer.embed_batched(images.to(device)).float()


def genuine_distances(
    recognizer: FaceRecognizer, gallery: FaceGallery, data: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """Same-person distances: real pairs when identities have several photos, else re-crop jitter."""
    labels = gallery.labels
    if len(set(gallery.identities)) < len(gallery):
        descriptors = _embed(recognizer, gallery.images)
        d = torch.cdist(descriptors, descriptors)
        upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
        labels = labels.to(d.device)
        return d[upper & (labels[:, None] == labels[None, :])], "same-person photo pairs"
    if data["name"] != "faces":
        return torch.empty(0), "none (one photo per identity)"
    original, jittered, _ = genuine_jitter_pairs(
        margin=float(data.get("margin", 0.0)), boxes=str(data.get("boxes", "aligned"))
    )
    return (
        recognizer.distance(_embed(recognizer, original), _embed(recognizer, jittered)),
        "re-crops of the same photo with a jittered box (a lower bound on real same-person distances)",
    )


def split_impostor_pairs(
    descriptors: torch.Tensor, identities: list[str], excluded: set[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Impostor distances (every pair of photos of different people) split in two: pairs of people
    outside ``excluded`` (fit the threshold) and pairs with at least one of them (measure it)."""
    if descriptors.shape[0] != len(identities):
        raise ConfigError(f"{descriptors.shape[0]} descriptors for {len(identities)} identity labels")
    d = torch.cdist(descriptors, descriptors)
    labels = {name: i for i, name in enumerate(sorted(set(identities)))}
    ids = torch.tensor([labels[name] for name in identities], device=d.device)
    inside = torch.tensor([name in excluded for name in identities], device=d.device)
    impostor = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1) & (ids[:, None] != ids[None, :])
    touches = inside[:, None] | inside[None, :]
    return d[impostor & ~touches], d[impostor & touches]


def check_fit_pairs(identities: list[str], study: set[str], threshold: float | None) -> None:
    """A threshold to fit needs at least 2 impostor pairs of people outside the study (checked before
    any work: counting photos needs no recognizer)."""
    if threshold is not None:
        return
    outside = [name for name in identities if name not in study]
    pairs = sum(a != b for i, a in enumerate(outside) for b in outside[i + 1 :])
    if pairs < 2:
        raise ConfigError(
            "face.threshold=calibrated fits the threshold on impostor pairs of people outside the study, "
            f"but face.attackers and face.targets leave {len(set(outside))} identities ({pairs} pairs) "
            "outside; name fewer attackers and targets, add identities, or set face.threshold to a distance"
        )


def calibrate_apart(
    recognizer: FaceRecognizer,
    gallery: FaceGallery,
    study: set[str],
    data: dict[str, Any],
    far: float,
    threshold: float | None = None,
) -> tuple[Calibration, dict[str, Any]]:
    """The threshold fitted at false-accept rate ``far`` on impostor pairs of people outside ``study``
    (the attackers and targets), measured on the other impostor pairs (results.json ``verification``).

    Why apart: a threshold fitted on the attack's own faces makes the reported false-accept rate the
    fitted value, which cannot fail; measured on pairs the fit never saw, it can. ``threshold`` (a
    number from ``face.threshold``) is measured the same way, with nothing fitted.
    """
    check_fit_pairs(gallery.identities, study, threshold)
    descriptors = _embed(recognizer, gallery.images)
    fit, held_out = split_impostor_pairs(descriptors, gallery.identities, study)
    genuine, genuine_source = genuine_distances(recognizer, gallery, data)
    fitted_on = fit if fit.numel() >= 2 else held_out  # a set threshold fits nothing
    calibration = calibrate_threshold(fitted_on, far, genuine.to(descriptors.device))
    if threshold is not None:
        calibration = replace(calibration, threshold=float(threshold))
    report = calibration_report(calibration, DEFAULT_THRESHOLD, genuine_source, fit, held_out)
    report["excluded_identities"] = sorted(study)
    report["threshold_fitted"] = threshold is None
    return calibration, report


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "p05": None, "median": None, "max": None}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5], dtype=torch.float64)).tolist()
    return {"min": float(t.min()), "p05": q[0], "median": q[1], "max": float(t.max())}


def held_out_rate(distances: torch.Tensor, threshold: float) -> dict[str, Any]:
    """The false-accept rate of ``threshold`` on impostor ``distances``, with its 95% Clopper-Pearson
    interval (None on no pair)."""
    n = int(distances.numel())
    k = int((distances < threshold).sum())
    return {
        "pairs": n,
        "false_accepts": k,
        "false_accept_rate": k / n if n else None,
        "interval": list(clopper_pearson(k, n)) if n else None,
        "confidence": 0.95,
    }


def calibration_report(
    calibration: Calibration,
    published: float,
    genuine_source: str,
    fit: torch.Tensor,
    held_out: torch.Tensor,
) -> dict[str, Any]:
    """What the threshold rests on: the false-accept rate measured on the held-out impostor pairs
    (``false_accept_rate`` and ``calibrated``/``published`` are those, never the fitted value), the
    fitted pairs' rate beside it, both distributions, and the genuine pairs' false-reject rates."""
    genuine = calibration.genuine_distances

    def rates(threshold: float) -> dict[str, Any]:
        measured = held_out_rate(held_out, threshold)
        frr = sum(d >= threshold for d in genuine) / len(genuine) if genuine else None
        return {"threshold": threshold, "false_accept_rate": measured["false_accept_rate"],
                "false_accept_interval": measured["interval"], "false_reject_rate": frr}  # fmt: skip

    measured = held_out_rate(held_out, calibration.threshold)
    impostor = torch.cat([fit.flatten(), held_out.flatten()]).double().tolist()
    return {
        "target_far": calibration.target_far,
        "false_accept_rate": measured["false_accept_rate"],
        "false_accept_interval": measured["interval"],
        "held_out": measured,
        "fit": held_out_rate(fit, calibration.threshold),
        "calibrated": rates(calibration.threshold),
        "published": rates(published),
        "impostor_pairs": len(impostor),
        "genuine_pairs": len(genuine),
        "genuine_source": genuine_source,
        "impostor_distance": _quantiles(impostor),
        "genuine_distance": _quantiles(genuine),
    }
