"""What a face study holds out: the photo split, the threshold fitted apart from the attack, and the
statistics (random-patch baseline test, false-accept interval). Hand-made numbers, milliseconds each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustcnn.errors import ConfigError
from robustcnn.face.baselines import baseline_check, clopper_pearson, paired_p_value
from robustcnn.face.calibration import calibrate_apart, calibration_report, split_impostor_pairs
from robustcnn.face.enrolment import enrol_photos
from robustcnn.face.gallery import FaceGallery, FaceSource
from robustcnn.face.splits import (
    HELD_OUT_PHOTOS,
    HELD_OUT_TRANSFORMS,
    impersonation_held_out,
    split_photos,
)
from robustcnn.models.face.recognizer import FaceRecognizer, calibrate_threshold

# --------------------------------------------------------------------------------------------------
# The photo split


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_split_roles_and_labels(n: int) -> None:
    rows = list(range(10, 10 + n))
    split = split_photos(rows, seed=3, identity="ann")
    assert len(split.enrolment) == 1
    used = set(split.enrolment) | set(split.optimisation) | set(split.evaluation)
    assert used == set(rows)  # every photo has a role, none is invented
    if n == 1:
        assert split.held_out == HELD_OUT_TRANSFORMS and not split.template_unseen
    elif n == 2:  # the attacker optimises on the enrolled photo, and is judged on the other one
        assert split.enrolment == split.optimisation and split.held_out == HELD_OUT_PHOTOS
        assert not split.template_unseen
    else:  # enrolment, optimisation and evaluation are disjoint
        assert not set(split.evaluation) & set(split.optimisation)
        assert not set(split.enrolment) & (set(split.optimisation) | set(split.evaluation))
        assert split.held_out == HELD_OUT_PHOTOS and split.template_unseen
        assert len(split.evaluation) == (n - 1) // 2 and split.optimisation


def test_split_is_seeded_per_identity() -> None:
    rows = list(range(6))
    assert split_photos(rows, 0, "ann") == split_photos(rows, 0, "ann")
    seen = {split_photos(rows, seed, "ann") for seed in range(8)}
    assert len(seen) > 1, "the seed must choose the split"
    assert split_photos(rows, 0, "ann") != split_photos(rows, 0, "bob") or len(seen) > 1


def test_impersonation_is_photo_held_out_only_with_an_unseen_target_template() -> None:
    three = split_photos([0, 1, 2], 0, "ann")
    one = split_photos([3], 0, "bob")
    two = split_photos([4, 5], 0, "cid")
    assert impersonation_held_out(one, three) == HELD_OUT_TRANSFORMS  # no held-out photo of the attacker
    assert impersonation_held_out(two, one) == HELD_OUT_TRANSFORMS  # the target's template was aimed at
    assert impersonation_held_out(two, three) == HELD_OUT_PHOTOS


def test_enrolment_records_the_split_by_file_name() -> None:
    photos = torch.rand(5, 3, 8, 8)
    enrolment = enrol_photos(photos, ["ann", "ann", "ann", "bob", "cid"], seed=1, files=list("abcde"))
    assert enrolment.names == ["ann", "bob", "cid"] and enrolment.images.shape[0] == 3
    record = enrolment.record()
    assert record["seed"] == 1 and set(record["identities"]) == {"ann"}  # one-photo people: nothing split
    ann = record["identities"]["ann"]
    assert ann["held_out"] == HELD_OUT_PHOTOS and ann["template_unseen"]
    assert sorted(ann["enrolment"] + ann["optimisation"] + ann["evaluation"]) == ["a", "b", "c"]
    assert enrolment.evaluation_faces(1) is None  # bob has one photo: nothing is held out
    held = enrolment.evaluation_faces(0)
    assert held is not None and held.shape[0] == 1
    assert not any(torch.equal(held[0], face) for face in enrolment.optimisation_faces(0))
    with pytest.raises(ConfigError, match="identity names"):
        enrol_photos(photos, ["ann"])


# --------------------------------------------------------------------------------------------------
# The threshold fitted apart from the attack


def test_impostor_pairs_split_by_the_study_identities() -> None:
    descriptors = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    fit, held = split_impostor_pairs(descriptors, ["a", "a", "b", "c", "d"], excluded={"a"})
    assert sorted(fit.tolist()) == [3.0, 4.0, 7.0]  # b-c, c-d, b-d: no pair touches a
    assert len(held) == 6 and 1.0 not in held.tolist()  # a-b, a-c, a-d from both photos; a-a is genuine


def test_reported_far_is_the_one_measured_on_pairs_the_fit_never_saw() -> None:
    # built so the two disagree: the fit's impostors lie far apart, the held-out ones close together
    fit = torch.tensor([0.50, 0.60, 0.70, 0.80, 0.90, 1.00, 1.10, 1.20, 1.30, 1.40])
    held = torch.tensor([0.10, 0.20, 0.55, 0.65, 0.95, 1.50])
    calibration = calibrate_threshold(fit, far=0.1)
    assert calibration.threshold == pytest.approx(0.60)
    report = calibration_report(calibration, 0.6, "none", fit, held)
    fitted = float((fit < calibration.threshold).double().mean())
    measured = float((held < calibration.threshold).double().mean())
    assert fitted == pytest.approx(0.1) and measured == pytest.approx(0.5)  # the case really differs
    assert report["false_accept_rate"] == pytest.approx(measured) != pytest.approx(fitted)
    assert report["calibrated"]["false_accept_rate"] == pytest.approx(measured)
    assert report["held_out"]["pairs"] == 6 and report["held_out"]["false_accepts"] == 3
    assert report["fit"]["false_accept_rate"] == pytest.approx(fitted)
    low, high = report["false_accept_interval"]
    assert (low, high) == pytest.approx(clopper_pearson(3, 6)) and low < measured < high


def test_clopper_pearson_matches_its_closed_form_at_zero() -> None:
    low, high = clopper_pearson(0, 45)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 45))
    with pytest.raises(ValueError):
        clopper_pearson(3, 0)


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _gallery(levels: list[float], names: list[str]) -> FaceGallery:
    crops = np.stack([np.full((150, 150, 3), int(255 * v), dtype=np.uint8) for v in levels])
    return FaceGallery(crops, names, [FaceSource(f"{i}.png", (0, 0, 150, 150)) for i in range(len(names))])


def test_calibration_never_uses_the_studys_faces_and_says_when_it_cannot() -> None:
    recognizer = FaceRecognizer(_Identity(), threshold=0.5, name="mean colour")
    gallery = _gallery([0.0, 0.02, 0.4, 0.6, 0.8], ["att", "tgt", "x", "y", "z"])
    calibration, report = calibrate_apart(recognizer, gallery, {"att", "tgt"}, {"name": "face_folder"}, 0.0)
    # fitted on x, y, z alone (their pairs are >= 0.2 * sqrt(3) apart), never on att-tgt (0.02 apart)
    assert calibration.threshold == pytest.approx(0.2 * 3**0.5, abs=0.01)
    assert report["fit"]["pairs"] == 3 and report["held_out"]["pairs"] == 7
    assert report["excluded_identities"] == ["att", "tgt"] and report["threshold_fitted"]
    assert report["false_accept_rate"] == pytest.approx(1 / 7)  # att-tgt is accepted: measured, not fitted
    with pytest.raises(ConfigError, match=r"leave 1 identities \(0 pairs\) outside.*face\.threshold"):
        calibrate_apart(recognizer, gallery, {"att", "tgt", "x", "y"}, {"name": "face_folder"}, 0.01)
    fixed, measured = calibrate_apart(
        recognizer, gallery, {"att", "tgt", "x", "y"}, {"name": "face_folder"}, 0.01, threshold=0.1
    )
    assert fixed.threshold == 0.1 and not measured["threshold_fitted"]


# --------------------------------------------------------------------------------------------------
# The random-patch baseline test and the study check


def test_paired_test_needs_discordant_draws_in_the_patchs_favour() -> None:
    assert paired_p_value(0, 0) == 1.0
    assert paired_p_value(10, 0) == pytest.approx(0.5**10)
    assert paired_p_value(3, 3) > 0.5
    assert paired_p_value(0, 10) == 1.0
    with pytest.raises(ValueError):
        paired_p_value(-1, 2)


def test_the_study_check_fails_on_a_patch_that_does_not_beat_its_baseline() -> None:
    good = {"goal": "dodging", "attacker": "ann", "target": None, "beats_baseline": True, "p_value": 1e-4}
    bad = {
        "goal": "impersonation",
        "attacker": "ann",
        "target": "bob",
        "beats_baseline": False,
        "p_value": 0.4,
    }
    assert baseline_check([good])["passed"] is True
    failed = baseline_check([good, bad])
    assert failed["passed"] is False and failed["status"] == "failed"
    assert "impersonation ann as bob (p=0.4)" in failed["detail"]
    assert baseline_check([])["status"] == "skipped"
