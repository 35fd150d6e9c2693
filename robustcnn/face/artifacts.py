"""What a face study leaves on disk beside results.json: the patches as printed and the figures.

Why files: a physical patch is meant to be printed and worn, and the numbers are easier to trust
next to the faces they came from (clean vs. patched), the impersonation matrix and the distance
distributions the threshold was set on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from robustcnn.face.settings import FacePlan
from robustcnn.face.study import FaceStudyResult
from robustcnn.files import safe_file_name
from robustcnn.models.face.recognizer import Calibration


def face_titles(keys: list[str]) -> list[str]:
    """Two short lines per patch key (``dodging/<name>``, ``impersonation/<a>__<t>``): who, and what for."""
    return [
        name.replace("__", "\nas ") if "__" in name else f"{name}\ndodging"
        for name in (key.split("/", 1)[1] for key in keys)
    ]


def write_face_artifacts(
    out: Path,
    study: FaceStudyResult,
    plan: FacePlan,
    calibration: Calibration,
    published: float,
) -> list[Path]:
    """Patch PNGs (as printed), clean vs. patched faces (each on the photo it was judged on, a held-out
    photo where there is one), the impersonation matrix, the distances."""
    from robustcnn.face.plots import distance_histogram, face_grid, save_patch_png, success_matrix

    written: list[Path] = []
    for key, patch in study.patches.items():
        goal, name = key.split("/", 1)
        written.append(
            save_patch_png(patch, plan.mask, out / "patches" / goal / f"{safe_file_name(name)}.png")
        )
    kept = list(study.adversarial_faces.items())[: plan.keep_faces]
    if kept:
        clean = torch.stack([study.clean_faces[key] for key, _ in kept])
        patched = torch.stack([face for _, face in kept])
        titles = face_titles([key for key, _ in kept])
        written.append(
            face_grid([("clean", clean), ("with patch", patched)], titles, out / "adversarial_faces.png")
        )
    matrix = study.metrics.get("impersonation_matrix") or {}
    if matrix.get("targets"):
        written.append(
            success_matrix(
                matrix["success_rate"],
                matrix["attackers"],
                matrix["targets"],
                out / "impersonation_matrix.png",
            )
        )
    thresholds = {"published": published, "calibrated": calibration.threshold}
    written.append(
        distance_histogram(
            calibration.impostor_distances,
            calibration.genuine_distances,
            thresholds,
            out / "distance_distributions.png",
        )
    )
    return written
