"""Transfer: a face study scores every patch on recognizers it never optimised against
(``face.holdout_recognizers``), each with its own threshold fitted apart and its own templates, on
held-out photos where the split has them, next to the patch's random baseline. Tiny synthetic
recognizers on random 32x32 faces: seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustcnn.errors import ConfigError
from robustcnn.face.enrolment import enrol
from robustcnn.face.gallery import FaceGallery, FaceSource
from robustcnn.face.patch import PatchSettings
from robustcnn.face.settings import DEFAULT_HOLDOUTS, FacePlan
from robustcnn.face.study import run_face_study
from robustcnn.face.transfer import TRANSFER_PHOTOS, TRANSFER_TRANSFORMS, prepare_holdouts
from robustcnn.face.transforms import PhysicalVariation
from robustcnn.models.face.recognizer import FaceRecognizer


def _embedder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 8))


def _gallery() -> FaceGallery:
    names = ["ann", "ann", "ann", "bob", "cid", "dan", "eve"]
    crops = np.random.default_rng(0).integers(0, 256, (len(names), 32, 32, 3), dtype=np.uint8)
    return FaceGallery(crops, names, [FaceSource(f"{i}.png", (0, 0, 32, 32)) for i in range(len(names))])


def test_every_patch_is_scored_on_the_held_out_recognizers_with_their_own_threshold() -> None:
    gallery = _gallery()
    enrolment = enrol(gallery, seed=0)
    attacked = FaceRecognizer(_embedder(0), threshold=1.0, name="attacked")
    held = FaceRecognizer(_embedder(1), threshold=123.0, name="other")
    cpu = torch.device("cpu")
    holdouts = prepare_holdouts([held], gallery, enrolment, {"ann", "bob"}, {"name": "face_folder"}, 0.0, cpu)
    assert held.threshold != 123.0  # fitted apart from the study, like the attacked recognizer's
    mask = torch.zeros(32, 32)
    mask[8:16, 4:28] = 1.0
    settings = PatchSettings(steps=2, eot_samples=2, variation=PhysicalVariation.identity())
    result = run_face_study(attacked, enrolment, [0], [1], mask, settings, eval_draws=3, holdouts=holdouts)
    metrics = result.metrics
    dodging, impersonation = metrics["patches"]
    # ann has three photos: her dodging patch is judged on the one it never saw; bob has one photo
    assert dodging["transfer"]["other"]["held_out"] == TRANSFER_PHOTOS
    assert impersonation["transfer"]["other"]["held_out"] == TRANSFER_TRANSFORMS
    record = dodging["transfer"]["other"]
    assert record["threshold"] == held.threshold and record["n_faces"] == 1 and record["n_evaluations"] == 3
    assert 0.0 <= record["random_patch_success_rate"] <= 1.0 and "beats_baseline" in record
    summary = metrics["transfer"]["other"]
    assert summary["threshold"] == held.threshold and summary["verification"]["held_out"]["pairs"] > 0
    assert [(row["goal"], row["held_out"]) for row in summary["figures"]] == [
        ("dodging", TRANSFER_PHOTOS), ("impersonation", TRANSFER_TRANSFORMS),
    ]  # fmt: skip
    key = "transfer_other_dodging_held_out_photos_success_rate"
    assert metrics[key] == record["success_rate"] and metrics["held_out"][key] == TRANSFER_PHOTOS
    assert metrics["held_out"]["transfer_other_impersonation_random_success_rate"] == TRANSFER_TRANSFORMS
    assert metrics["held_out"]["dodging_success_rate"] == "transforms_only"  # the study's own keys unchanged
    bare = run_face_study(attacked, enrolment, [0], [], mask, settings, eval_draws=3)
    assert bare.metrics["transfer"] == {} and bare.metrics["patches"][0]["transfer"] == {}


def test_holdout_recognizers_setting() -> None:
    assert FacePlan.from_mapping({}, seed=0).holdout_recognizers == DEFAULT_HOLDOUTS
    assert FacePlan.from_mapping({"holdout_recognizers": []}, seed=0).holdout_recognizers == ()
    with pytest.raises(ConfigError, match="the recognizer the patches are optimised against"):
        FacePlan.from_mapping({"recognizer": "faceres", "holdout_recognizers": ["faceres"]}, seed=0)
    with pytest.raises(ConfigError, match=r"face.holdout_recognizers=.* must be a list"):
        FacePlan.from_mapping({"holdout_recognizers": "faceres"}, seed=0)
