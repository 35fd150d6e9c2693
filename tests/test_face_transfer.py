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
from robustcnn.face.settings import FacePlan
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
    def plan(**values: object) -> FacePlan:
        return FacePlan.from_mapping(values, seed=0)

    # auto (the default): every shipped recognizer the optimisation does not use
    assert plan().holdout_recognizers == ("faceres", "mobileface")
    assert plan(recognizer="faceres").holdout_recognizers == ("face_api", "mobileface")
    ensemble = plan(recognizer="face_api", recognizers=["faceres", "face_api"])
    assert ensemble.recognizer == "faceres" and ensemble.ensemble == ("faceres", "face_api")
    assert ensemble.holdout_recognizers == ("mobileface",)
    assert plan(holdout_recognizers=[]).holdout_recognizers == ()
    assert plan(holdout_recognizers=["mobileface"]).holdout_recognizers == ("mobileface",)
    with pytest.raises(ConfigError, match="lists faceres, optimised against"):
        plan(recognizers=["face_api", "faceres"], holdout_recognizers=["faceres", "mobileface"])
    with pytest.raises(ConfigError, match=r"face.holdout_recognizers=.* must be a list"):
        plan(holdout_recognizers="faceres")
    with pytest.raises(ConfigError, match=r"face.recognizers=.* must be a list"):
        plan(recognizers="faceres")


def test_ensemble_loss_averages_the_members_and_succeeds_only_when_all_are_fooled() -> None:
    from robustcnn.face.attack import ensemble_loss
    from robustcnn.face.patch import ModelLoss

    first, second = nn.Identity(), nn.Identity()
    a = ModelLoss(lambda x, i: (torch.tensor([1.0, 3.0]), torch.tensor([True, True])), (first,))
    b = ModelLoss(lambda x, i: (torch.tensor([3.0, 5.0]), torch.tensor([True, False])), (second,))
    value, success = ensemble_loss([a, b])(torch.zeros(2), torch.arange(2))
    assert value.tolist() == [2.0, 4.0] and success.tolist() == [True, False]
    assert ensemble_loss([a, b]).modules == (first, second)  # both are frozen while the patch is optimised


def test_an_ensemble_patch_is_optimised_against_every_member() -> None:
    gallery = _gallery()
    enrolment = enrol(gallery, seed=0)
    attacked = FaceRecognizer(_embedder(0), threshold=1.0, name="attacked")
    member = FaceRecognizer(_embedder(2), threshold=1.0, name="member")
    mask = torch.zeros(32, 32)
    mask[8:16, 4:28] = 1.0
    settings = PatchSettings(steps=3, eot_samples=2, variation=PhysicalVariation.identity(), early_stop=False)
    alone = run_face_study(attacked, enrolment, [0], [], mask, settings, eval_draws=2)
    both = run_face_study(attacked, enrolment, [0], [], mask, settings, eval_draws=2, ensemble=[member])
    assert [m["recognizer"] for m in both.metrics["ensemble"]] == ["attacked", "member"]
    assert [m["recognizer"] for m in alone.metrics["ensemble"]] == ["attacked"]
    # same seed, same draws (a re-run gives the same patch): only the member's gradient can differ
    again = run_face_study(attacked, enrolment, [0], [], mask, settings, eval_draws=2)
    assert torch.equal(alone.patches["dodging/ann"], again.patches["dodging/ann"])
    assert not torch.equal(alone.patches["dodging/ann"], both.patches["dodging/ann"])
