"""The verification threshold a face study attacks, and what it rests on.

Why calibrate: face-api's published 0.6 accepts many impostor pairs on tight crops, so a patch
would "succeed" against a recognizer nobody would deploy. The study sets the threshold at a target
false-accept rate on the gallery's impostor pairs and reports both thresholds' error rates, with the
genuine (same-person) distances they are measured against and where those came from.
"""

from __future__ import annotations

from typing import Any  # Any: the data section (config) and the JSON report

import torch

from robustcnn.face.gallery import FaceGallery, genuine_jitter_pairs
from robustcnn.models.face.recognizer import (
    DEFAULT_THRESHOLD,
    Calibration,
    FaceRecognizer,
    calibrate_threshold,
    impostor_pairs,
)


def genuine_distances(
    recognizer: FaceRecognizer, gallery: FaceGallery, data: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """Same-person distances: real pairs when identities have several photos, else re-crop jitter."""
    labels = gallery.labels
    if len(set(gallery.identities)) < len(gallery):
        descriptors = recognizer.embed_batched(gallery.images)
        d = torch.cdist(descriptors, descriptors)
        upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
        return d[upper & (labels[:, None] == labels[None, :])], "same-person photo pairs"
    if data["name"] != "faces":
        return torch.empty(0), "none (one photo per identity)"
    original, jittered, _ = genuine_jitter_pairs(
        margin=float(data.get("margin", 0.0)), boxes=str(data.get("boxes", "aligned"))
    )
    return (
        recognizer.distance(recognizer.embed_batched(original), recognizer.embed_batched(jittered)),
        "re-crops of the same photo with a jittered box (a lower bound on real same-person distances)",
    )


def calibrate_on_gallery(
    recognizer: FaceRecognizer,
    images: torch.Tensor,
    names: list[str],
    gallery: FaceGallery,
    data: dict[str, Any],
    far: float,
) -> tuple[Calibration, dict[str, Any]]:
    """The threshold at false-accept rate ``far`` on the impostor pairs of the enrolled ``images`` (one
    per identity in ``names``), and its report against face-api's published threshold (results.json's
    ``verification``), with the gallery's genuine distances alongside."""
    descriptors = recognizer.embed_batched(images)
    genuine, genuine_source = genuine_distances(recognizer, gallery, data)
    calibration = calibrate_threshold(impostor_pairs(descriptors, names), far, genuine.to(descriptors.device))
    return calibration, calibration_report(calibration, DEFAULT_THRESHOLD, genuine_source)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "p05": None, "median": None, "max": None}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5], dtype=torch.float64)).tolist()
    return {"min": float(t.min()), "p05": q[0], "median": q[1], "max": float(t.max())}


def calibration_report(calibration: Calibration, published: float, genuine_source: str) -> dict[str, Any]:
    """What the threshold rests on: both distributions and both thresholds' error rates."""
    impostor, genuine = calibration.impostor_distances, calibration.genuine_distances

    def rates(threshold: float) -> dict[str, float | None]:
        far = sum(d < threshold for d in impostor) / len(impostor)
        frr = sum(d >= threshold for d in genuine) / len(genuine) if genuine else None
        return {"threshold": threshold, "false_accept_rate": far, "false_reject_rate": frr}

    return {
        "target_far": calibration.target_far,
        "calibrated": rates(calibration.threshold),
        "published": rates(published),
        "impostor_pairs": len(impostor),
        "genuine_pairs": len(genuine),
        "genuine_source": genuine_source,
        "impostor_distance": _quantiles(impostor),
        "genuine_distance": _quantiles(genuine),
    }
