"""Transfer: every patch scored on recognizers its optimisation never saw (``face.holdout_recognizers``).

Why: a patch that fools only the network it was optimised against is a property of that network; a
physical attack matters when it fools a recognizer the attacker had no access to. Each held-out
recognizer gets what the attacked one gets, on its own: a threshold fitted at the study's false-accept
rate on impostor pairs of people outside the study and measured on the others
(:func:`~robustcnn.face.calibration.calibrate_apart`), its own enrolled templates, and every patch's
evaluation (:func:`~robustcnn.face.evaluation.evaluate_patch`) on held-out draws next to the patch's
random baseline and the bare face, with the paired test. Where the attacker has photos the
optimisation never saw (and, for impersonation, the target's template comes from unseen photos too),
the patch is judged on those (``held_out: recognizer+photos``); else on its optimisation photos
(``recognizer+transforms_only``: only the recognizer and the draws are new).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any  # Any: the JSON-able evaluations

import torch
from torch import Tensor

from robustcnn.face.calibration import calibrate_apart
from robustcnn.face.enrolment import Enrolment, templates
from robustcnn.face.evaluation import evaluate_patch
from robustcnn.face.gallery import FaceGallery
from robustcnn.face.splits import HELD_OUT_PHOTOS, HELD_OUT_TRANSFORMS, impersonation_held_out
from robustcnn.face.transforms import PhysicalVariation
from robustcnn.models.face.recognizer import FaceRecognizer

#: What a transfer evaluation held out: the recognizer and the photos, or the recognizer and the draws.
TRANSFER_PHOTOS = f"recognizer+{HELD_OUT_PHOTOS}"
TRANSFER_TRANSFORMS = f"recognizer+{HELD_OUT_TRANSFORMS}"
#: The per-evaluation keys a transfer record keeps (the published-threshold ones are face-api's 0.6,
#: meaningless for another recognizer's descriptors).
_KEPT = (
    "held_out", "threshold", "n_faces", "n_draws", "n_evaluations", "success_rate",
    "success_rate_identification", "clean_success_rate", "clean_success_rate_identification",
    "distance_before", "distance_after", "successes", "baseline_successes", "patch_only",
    "baseline_only", "p_value", "beats_baseline",
)  # fmt: skip


@dataclass(frozen=True)
class HeldOutRecognizer:
    """A recognizer kept out of the optimisation, calibrated apart, with its enrolled templates."""

    recognizer: FaceRecognizer
    enrolled: Tensor  # [G, D]
    verification: dict[str, Any]  # the calibration report (results.json ``verification`` shape)


def prepare_holdouts(
    recognizers: list[FaceRecognizer],
    gallery: FaceGallery,
    enrolment: Enrolment,
    study: set[str],
    data: dict[str, Any],
    far: float,
    device: torch.device,
) -> list[HeldOutRecognizer]:
    """Each recognizer's threshold fitted at ``far`` apart from ``study`` (the attackers and targets),
    set on it, and its enrolled templates."""
    prepared = []
    for recognizer in recognizers:
        calibration, report = calibrate_apart(recognizer, gallery, study, data, far)
        recognizer.threshold = calibration.threshold
        enrolled, _ = templates(recognizer, enrolment, device)
        prepared.append(HeldOutRecognizer(recognizer, enrolled, report))
    return prepared


@dataclass(frozen=True)
class TransferJudge:
    """What every transfer evaluation of a study shares: the held-out recognizers, the photos, the
    mask and the held-out draws (the same as the attacked recognizer's evaluation)."""

    holdouts: list[HeldOutRecognizer]
    enrolment: Enrolment
    mask: Tensor
    variation: PhysicalVariation
    eval_draws: int
    seed: int
    batch_size: int

    def _faces(self, a: int, t: int | None) -> tuple[Tensor, str]:
        """The attacker's unseen photos where the split allows it, else the optimisation photos."""
        enrolment = self.enrolment
        faces = enrolment.evaluation_faces(a)
        label = HELD_OUT_PHOTOS
        if t is not None:
            label = impersonation_held_out(enrolment.splits[a], enrolment.splits[t])
        if faces is not None and label == HELD_OUT_PHOTOS:
            return faces, TRANSFER_PHOTOS
        return enrolment.optimisation_faces(a), TRANSFER_TRANSFORMS

    def judge(self, patch: Tensor, a: int, t: int | None, baseline_seed: int) -> dict[str, Any]:
        """The patch on every held-out recognizer: recognizer name -> its evaluation (kept keys, and
        the random patch's and bare face's success rates beside the patch's)."""
        faces, label = self._faces(a, t)
        faces = faces.to(self.mask.device)
        records: dict[str, Any] = {}
        for held in self.holdouts:
            evaluation = evaluate_patch(
                held.recognizer, faces, patch, self.mask, held.enrolled, a, t, self.variation,
                self.eval_draws, self.seed, self.batch_size, baseline_seed=baseline_seed, held_out=label,
            )  # fmt: skip
            record = {key: evaluation[key] for key in _KEPT}
            record["random_patch_success_rate"] = evaluation["random_patch"]["success_rate"]
            records[held.recognizer.name] = record
        return records


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def transfer_summary(holdouts: list[HeldOutRecognizer], records: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json ``transfer``: per held-out recognizer, its threshold and measured false-accept
    rate, and per goal and what was held out, the mean success next to the random patch and the bare
    face, and how many patches beat their random patch."""
    summary: dict[str, Any] = {}
    for held in holdouts:
        name = held.recognizer.name
        rows = []
        for goal in ("dodging", "impersonation"):
            for label in (TRANSFER_PHOTOS, TRANSFER_TRANSFORMS):
                ours = [r["transfer"][name] for r in records if r["goal"] == goal]
                runs = [e for e in ours if e["held_out"] == label]
                if not runs:
                    continue
                rows.append({
                    "goal": goal,
                    "held_out": label,
                    "patches": len(runs),
                    "success_rate": _mean([e["success_rate"] for e in runs]),
                    "random_patch_success_rate": _mean([e["random_patch_success_rate"] for e in runs]),
                    "clean_success_rate": _mean([e["clean_success_rate"] for e in runs]),
                    "beat_baseline": sum(bool(e["beats_baseline"]) for e in runs),
                    "n_evaluations": sum(int(e["n_evaluations"]) for e in runs),
                })  # fmt: skip
        summary[name] = {
            "threshold": held.recognizer.threshold,
            "weights_sha256": held.recognizer.weights_sha256,
            "false_accept_rate": held.verification["false_accept_rate"],
            "false_accept_interval": held.verification["false_accept_interval"],
            "verification": held.verification,
            "figures": rows,
        }
    return summary


def transfer_metrics(summary: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Flat results keys (MLflow metrics) of the transfer figures, and what each held out:
    ``transfer_<recognizer>_<goal>[_held_out_photos]_{success_rate,random_success_rate,clean_success_rate}``."""
    keys: dict[str, float | None] = {}
    held_out: dict[str, str] = {}
    for name, entry in summary.items():
        for row in entry["figures"]:
            suffix = "_held_out_photos" if row["held_out"] == TRANSFER_PHOTOS else ""
            stem = f"transfer_{name}_{row['goal']}{suffix}"
            keys[f"{stem}_success_rate"] = row["success_rate"]
            keys[f"{stem}_random_success_rate"] = row["random_patch_success_rate"]
            keys[f"{stem}_clean_success_rate"] = row["clean_success_rate"]
            held_out.update(dict.fromkeys(keys.keys() - held_out.keys(), row["held_out"]))
    return keys, held_out
