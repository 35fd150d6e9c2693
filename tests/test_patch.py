"""Physical patch engine: masks, EOT draws, TV/NPS, the optimiser's invariants, face and classifier goals.

Everything runs on a tiny, seeded, randomly initialised CNN embedder (faces: smooth random colour
fields), so the suite takes seconds and never waits for the real face-api port.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from robustcnn.errors import ConfigError
from robustcnn.face import patch as patch_engine
from robustcnn.face.attack import attack_face, dodging_loss
from robustcnn.face.enrolment import enrol_photos
from robustcnn.face.evaluation import evaluate_patch, random_patch_baseline
from robustcnn.face.masks import area_percent, check_mask, from_png, make_mask
from robustcnn.face.patch import PatchSettings, classifier_patch_loss, initial_patch, optimise_patch
from robustcnn.face.printability import (
    DEFAULT_PALETTE,
    MaskRegion,
    load_palette,
    non_printability_score,
    total_variation,
)
from robustcnn.face.settings import FacePlan
from robustcnn.face.study import patch_to_image, run_face_study
from robustcnn.face.transforms import PhysicalVariation, PrintModel, apply_patch, draw_generator
from robustcnn.models.face.recognizer import FaceRecognizer

SIZE = 150
NAMES = ["ann", "bob", "cid", "dee", "eve"]


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) / self.scale


def _tiny_embedder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 16),
    )


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """Five 'identities': smooth random colour fields, [5, 3, 150, 150] in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    return F.interpolate(
        torch.rand(5, 3, 5, 5, generator=g), size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )


@pytest.fixture(scope="module")
def recognizer(faces: torch.Tensor) -> FaceRecognizer:
    """Descriptors scaled to a median inter-identity distance of 1; threshold 0.6 x the smallest one."""
    inner = _tiny_embedder()
    with torch.no_grad():
        d = torch.cdist(inner(faces), inner(faces))
    off = d[~torch.eye(5, dtype=torch.bool)]
    scale = float(off.median())
    return FaceRecognizer(_Scaled(inner, scale), threshold=0.6 * float(off.min()) / scale, name="tiny")


@pytest.fixture(scope="module")
def gallery(recognizer: FaceRecognizer, faces: torch.Tensor) -> torch.Tensor:
    return recognizer.embed_batched(faces)


def _digital(**overrides: object) -> PatchSettings:
    base = {
        "steps": 60,
        "eot_samples": 4,
        "variation": PhysicalVariation.identity(),
        "step_size": 4 / 255,
        "early_stop_patience": 2,
    }
    base.update(overrides)
    return PatchSettings(**base)  # type: ignore[arg-type]


# -- masks -----------------------------------------------------------------------------------------
def test_mask_areas_and_placement() -> None:
    glasses = make_mask("eyeglasses")
    assert glasses.shape == (1, 1, SIZE, SIZE) and glasses.dtype == torch.float32
    assert set(glasses.unique().tolist()) == {0.0, 1.0}
    assert 5.5 < area_percent(glasses) < 6.5  # Sharif et al.'s frames: ~6 % of the face crop
    rows = glasses[0, 0].nonzero()[:, 0].float()
    assert 50 < float(rows.mean()) < 60  # eye level of the (tight) face box (~55 px)
    assert make_mask("sticker").sum() == 900 and area_percent(make_mask("sticker")) == pytest.approx(4.0)
    band = make_mask("hat_band")[0, 0].nonzero()[:, 0]
    assert int(band.max()) < 20 and int(band.min()) >= 0  # forehead, above the eyes
    assert make_mask("eyeglasses", 112).shape == (1, 1, 112, 112)


def test_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eyeglasses.*hat_band|valid masks"):
        make_mask("monocle")
    with pytest.raises(ConfigError, match="empty"):
        make_mask("sticker", center=(2.0, 2.0))
    with pytest.raises(ConfigError, match="face crop is 150x150"):
        check_mask(make_mask("sticker", 100), SIZE)
    with pytest.raises(ConfigError, match="empty"):
        check_mask(torch.zeros(1, 1, SIZE, SIZE), SIZE)


def test_mask_from_png(tmp_path: Path) -> None:
    from PIL import Image

    grey = np.zeros((SIZE, SIZE), dtype=np.uint8)
    grey[10:20, 30:50] = 200  # above 0.5: patch
    grey[40:45, 40:45] = 100  # anti-aliased edge below 0.5: not patch
    Image.fromarray(grey).save(tmp_path / "m.png")
    mask = from_png(tmp_path / "m.png", SIZE)
    assert int(mask.sum()) == 200 and mask[0, 0, 15, 40] == 1 and mask[0, 0, 42, 42] == 0
    assert torch.equal(make_mask("png", SIZE, path=tmp_path / "m.png"), mask)
    with pytest.raises(ConfigError, match="120x120 but the face crop is 150x150"):
        Image.fromarray(grey[:120, :120]).save(tmp_path / "small.png")
        from_png(tmp_path / "small.png", SIZE)
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ConfigError, match="empty"):
        from_png(tmp_path / "empty.png", SIZE)


# -- EOT draws -------------------------------------------------------------------------------------
def test_draws_are_seeded_and_held_out() -> None:
    var = PhysicalVariation()
    a = var.sample(16, draw_generator(0, "optimise"))
    b = var.sample(16, draw_generator(0, "optimise"))
    assert torch.equal(a.parameters(), b.parameters())  # reproducible
    other_seed = var.sample(16, draw_generator(1, "optimise"))
    held_out = var.sample(16, draw_generator(0, "evaluate"))
    assert not torch.allclose(a.parameters(), other_seed.parameters())
    assert not torch.allclose(a.parameters(), held_out.parameters())
    # no optimisation seed ever equals an evaluation seed
    opt = {draw_generator(s, "optimise").initial_seed() for s in range(200)}
    ev = {draw_generator(s, "evaluate").initial_seed() for s in range(200)}
    assert not opt & ev
    with pytest.raises(ConfigError, match="purpose"):
        draw_generator(0, "train")


def test_physical_composite(faces: torch.Tensor) -> None:
    mask = make_mask("eyeglasses")
    patch = torch.rand(3, SIZE, SIZE) * mask[0]
    # identity: exact composite, pixels outside the mask untouched bit for bit
    digital = apply_patch(faces, patch, mask, None, PhysicalVariation.identity())
    outside = (mask[0, 0] == 0).expand(3, -1, -1)
    assert torch.equal(digital[:, outside], faces[:, outside])
    assert torch.equal(digital[:, ~outside], patch[None].expand_as(faces)[:, ~outside])
    var = PhysicalVariation()
    draws = var.sample(5, draw_generator(3, "optimise"), (SIZE, SIZE), 5)
    physical = apply_patch(faces, patch, mask, draws, var)
    assert physical.shape == faces.shape and float(physical.min()) >= 0 and float(physical.max()) <= 1
    assert not torch.allclose(physical, digital)
    # only the patch moves: no face jitter, no photometry -> far from the frame nothing changes
    only_patch = PhysicalVariation.from_dict(
        {**PhysicalVariation.identity().to_dict(), "patch_translate_px": 3.0, "patch_rotation_deg": 4.0}
    )
    moved = apply_patch(faces, patch, mask, draws, only_patch)
    assert torch.equal(moved[:, :, 120:, :], faces[:, :, 120:, :])
    assert not torch.equal(moved[:, :, 50:85, :], digital[:, :, 50:85, :])
    # the print model washes colours out: white prints as 0.91
    white = PrintModel().apply(torch.ones(3, 2, 2))
    assert torch.allclose(white, torch.full_like(white, 0.91))
    with pytest.raises(ConfigError, match="no setting"):
        PhysicalVariation.from_dict({"warp": 1})


def test_patch_gradient_through_physical_draws(faces: torch.Tensor) -> None:
    mask = make_mask("sticker")
    patch = torch.full((3, SIZE, SIZE), 0.5, requires_grad=True)
    var = PhysicalVariation()
    out = apply_patch(faces, patch, mask, var.sample(5, draw_generator(0, "optimise"), (SIZE, SIZE), 5), var)
    out.sum().backward()
    assert patch.grad is not None and bool(torch.isfinite(patch.grad).all())
    assert float(patch.grad[:, mask[0, 0] == 0].abs().max()) == 0.0  # no gradient outside the mask


# -- TV / NPS --------------------------------------------------------------------------------------
def test_tv_and_nps_on_known_inputs(tmp_path: Path) -> None:
    mask = make_mask("eyeglasses")
    constant = torch.full((3, SIZE, SIZE), 0.3)
    assert float(total_variation(constant, mask)) == 0.0
    checker = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None, :]) % 2
    assert float(total_variation(checker.float().expand(3, -1, -1), mask)) > 1.0
    colour = torch.tensor(DEFAULT_PALETTE[5])[:, None, None].expand(3, SIZE, SIZE)
    for variant in ("product", "min"):
        assert float(non_printability_score(colour, mask, variant=variant)) < 1e-4
        saturated = torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, SIZE, SIZE)
        assert float(non_printability_score(saturated, mask, variant=variant)) > 0.05
    with pytest.raises(ConfigError, match="variant"):
        non_printability_score(colour, mask, variant="sum")
    (tmp_path / "p.json").write_text(json.dumps([[255, 0, 0], [0, 0, 255]]))
    palette = load_palette(tmp_path / "p.json")
    assert torch.allclose(palette, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    red = torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, SIZE, SIZE)
    assert float(non_printability_score(red, mask, palette, "min")) < 1e-4


# -- the engine ------------------------------------------------------------------------------------
def test_engine_invariants_and_model_state(
    faces: torch.Tensor, recognizer: FaceRecognizer, gallery: torch.Tensor
) -> None:
    embedder = recognizer.embedder
    embedder.train()  # the engine must switch to eval and restore this
    for p in embedder.parameters():
        p.requires_grad_(True)
    try:
        mask = make_mask("eyeglasses")
        settings = _digital(steps=5, tv_weight=0.1, nps_weight=0.1, early_stop=False)
        result = attack_face(recognizer, faces[:1], gallery, 0, None, mask, settings)
        assert embedder.training
        assert all(p.requires_grad and p.grad is None for p in embedder.parameters())
    finally:
        embedder.eval()
        for p in embedder.parameters():
            p.requires_grad_(False)
    outside = (mask[0, 0] == 0).expand(3, -1, -1)
    assert result.steps == 5 and len(result.history) == 5 and result.seconds > 0
    assert float(result.patch.min()) >= 0 and float(result.patch.max()) <= 1
    assert (
        float(result.patch[outside].abs().max()) == 0.0 and float(result.initial[outside].abs().max()) == 0.0
    )
    assert not torch.equal(result.patch, result.initial)  # it moved, inside the mask only
    composite = apply_patch(faces[:1], result.patch, mask, None, PhysicalVariation.identity())
    assert torch.equal(composite[0][outside], faces[0][outside])
    grey = initial_patch(mask, "grey")
    assert float(grey[~outside].min()) == 0.5
    with pytest.raises(ConfigError, match="optimizer"):
        PatchSettings(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="target other than the attacker"):
        attack_face(recognizer, faces[:1], gallery, 0, 0, mask, settings)


def test_dodging_and_impersonation_study(faces: torch.Tensor, recognizer: FaceRecognizer) -> None:
    mask = make_mask("eyeglasses")
    study = run_face_study(
        recognizer,
        enrol_photos(faces, NAMES),
        attackers=[0, 1],
        targets=[2, 3],
        mask=mask,
        settings=_digital(steps=80),
        eval_draws=8,  # 4 draws could never beat a baseline at p < 0.05 (at best p = 0.5 ** 4)
        seed=5,
    )
    m = study.metrics
    json.dumps(m)  # JSON-able, tensors kept apart
    assert m["clean_dodging_success_rate"] == 0.0 and m["clean_impersonation_success_rate"] == 0.0
    assert m["dodging_success_rate"] >= 0.99 and m["dodging_success_rate_identification"] >= 0.99
    assert m["impersonation_success_rate"] >= 0.75 and m["impersonation_success_rate_identification"] >= 0.75
    assert m["random_patch_success_rate"] is not None
    assert m["random_patch_success_rate"] < m["dodging_success_rate"]
    assert m["random_impersonation_success_rate"] < m["impersonation_success_rate"]
    matrix = m["impersonation_matrix"]
    assert matrix["attackers"] == ["ann", "bob"] and matrix["targets"] == ["cid", "dee"]
    # every patch's saliency maps are kept for the artifacts, their shares in results
    assert set(study.saliency) == set(study.patches) and len(study.saliency) == 6
    for record in m["patches"]:
        shares = [record["saliency"][f"{face}_mass_in_patch"] for face in ("clean", "patched")]
        assert all(share is not None and 0.0 <= share <= 1.0 for share in shares), record["saliency"]
        assert record["saliency"]["template"] == (record["target"] or record["attacker"])
    assert m["impersonation_saliency_in_patch_patched"] is not None and "saliency" not in str(m["held_out"])
    assert len(matrix["success_rate"]) == 2 and len(matrix["success_rate"][0]) == 2
    assert set(study.patches) == {
        "dodging/ann", "dodging/bob", "impersonation/ann__cid", "impersonation/ann__dee",
        "impersonation/bob__cid", "impersonation/bob__dee",
    }  # fmt: skip
    assert study.adversarial_faces["dodging/ann"].shape == (3, SIZE, SIZE)
    # one photo per person: only the physical draws are held out, and every figure says so
    patches = m["patches"]
    assert {p["held_out"] for p in patches} == {"transforms_only"}
    assert all(p["held_out_photos"] is None for p in patches)
    assert m["dodging_success_rate_held_out_photos"] is None
    assert m["held_out"]["dodging_success_rate"] == "transforms_only"
    assert [(f["goal"], f["held_out"]) for f in m["figures"]] == [
        ("dodging", "transforms_only"), ("impersonation", "transforms_only"),
    ]  # fmt: skip
    # a random baseline per patch, with its own seed, and each patch tested against it
    assert len({p["in_sample"]["random_patch"]["seed"] for p in patches}) == len(patches) == 6
    assert all(p["beats_baseline"] for p in patches) and m["checks"][0]["passed"] is True
    assert patches[0]["in_sample"]["patch_area_percent"] == pytest.approx(area_percent(mask))


def test_held_out_photos_are_judged_against_the_enrolled_template(
    faces: torch.Tensor, recognizer: FaceRecognizer
) -> None:
    """ann has three photos: the patch is optimised on one, judged on another, against the third's
    template; bob has one photo, so only the draws are held out for him."""
    g = torch.Generator().manual_seed(4)
    ann = (faces[0:1] + 0.03 * torch.randn(3, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    photos = torch.cat([ann, faces[1:]])
    names = ["ann", "ann", "ann", *NAMES[1:]]
    enrolment = enrol_photos(photos, names, seed=2)
    split = enrolment.splits[0]
    study = run_face_study(
        recognizer, enrolment, [0, 1], [], make_mask("eyeglasses"), _digital(steps=40), eval_draws=2, seed=1
    )
    ann_patch, bob_patch = study.metrics["patches"]
    assert ann_patch["held_out"] == "photos" and bob_patch["held_out"] == "transforms_only"
    held = ann_patch["held_out_photos"]
    assert held["held_out"] == "photos" and held["n_faces"] == 1 and bob_patch["held_out_photos"] is None
    # the bare held-out photo's distance is to the ENROLLED photo, not to the photo optimised on
    with torch.no_grad():
        d = recognizer.embed(photos[[split.evaluation[0], split.enrolment[0]]])
    assert held["distance_before"] == pytest.approx(float((d[0] - d[1]).norm()), rel=1e-4)
    assert ann_patch["success_rate"] == held["success_rate"]  # the headline is the held-out one
    recorded = study.metrics["photo_split"]["identities"]["ann"]
    assert recorded["evaluation"] == [f"row{split.evaluation[0]}"]
    rows = {(f["goal"], f["held_out"]): f for f in study.metrics["figures"]}
    assert rows[("dodging", "photos")]["patches"] == 1
    assert rows[("dodging", "transforms_only")]["patches"] == 2
    assert study.metrics["dodging_success_rate_held_out_photos"] == held["success_rate"]
    # the composite kept for the artifacts is the held-out photo, next to that photo without a patch
    assert torch.equal(study.clean_faces["dodging/ann"], photos[split.evaluation[0]])


def test_a_patch_no_better_than_noise_fails_the_study_check(
    faces: torch.Tensor, recognizer: FaceRecognizer
) -> None:
    """One tiny step from a random start: the 'patch' is noise, and the study says it beats nothing."""
    study = run_face_study(
        recognizer, enrol_photos(faces, NAMES), [0], [], make_mask("eyeglasses"),
        _digital(steps=1, step_size=1e-6, early_stop=False), eval_draws=4, seed=0,
    )  # fmt: skip
    (patch,) = study.metrics["patches"]
    assert patch["beats_baseline"] is False and patch["p_value"] >= 0.05
    (check,) = study.metrics["checks"]
    assert check["name"] == "patches_beat_random_baseline" and check["passed"] is False
    assert "dodging ann" in check["detail"]


def test_physical_evaluation_on_held_out_draws(
    faces: torch.Tensor, recognizer: FaceRecognizer, gallery: torch.Tensor
) -> None:
    mask = make_mask("eyeglasses")
    var = PhysicalVariation(face_translate_px=3.0)
    settings = PatchSettings(
        steps=15, eot_samples=4, step_size=8 / 255, variation=var, tv_weight=0.01, nps_weight=0.01, seed=1
    )
    found = attack_face(recognizer, faces[:2], gallery, 0, None, mask, settings, init="grey")
    report = evaluate_patch(
        recognizer, faces[:2], found.patch, mask, gallery, 0, None, var, n_draws=6, seed=1
    )
    assert report["n_evaluations"] == 12 and report["goal"] == "dodging"
    assert report["distance_after"] > report["distance_before"]
    assert report["success_rate"] >= report["random_patch"]["success_rate"]
    assert 0 <= report["nps"] <= 1 and report["tv"] > 0
    rp = random_patch_baseline(mask, 1)
    assert float(rp[:, mask[0, 0] == 0].abs().max()) == 0.0


# -- one step: draws in chunks, progress read late -------------------------------------------------
def test_eot_batch_gives_the_same_objective_and_gradient(
    faces: torch.Tensor, recognizer: FaceRecognizer, gallery: torch.Tensor
) -> None:
    """The same 7 physical draws through the recognizer all at once, one at a time and 3 at a time."""
    mask = check_mask(make_mask("eyeglasses"), SIZE)
    variation = PhysicalVariation()
    draws = variation.sample(7, draw_generator(0, "optimise"), (SIZE, SIZE), 2)
    patch = initial_patch(mask, "random", torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = dodging_loss(recognizer, gallery, 0)
    steps = {}
    for batch in (None, 1, 3):
        settings = PatchSettings(
            eot_samples=7, eot_batch=batch, variation=variation, tv_weight=0.1, nps_weight=0.1
        )
        steps[batch] = patch_engine._step(loss, faces[:2], patch, mask, MaskRegion.of(mask), draws, settings)
    whole = steps[None]
    scale = float(whole.grad.abs().max())
    assert scale > 0
    for batch in (1, 3):
        torch.testing.assert_close(steps[batch].total, whole.total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(steps[batch].grad, whole.grad, rtol=1e-4, atol=1e-5 * scale)
        assert torch.equal(steps[batch].success, whole.success)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="eot_batch=0"):
        PatchSettings(eot_batch=0)
    assert FacePlan.from_mapping({"eot_batch": 3}, 0).patch.eot_batch == 3
    assert FacePlan.from_mapping({}, 0).patch.eot_batch is None
    with pytest.raises(ConfigError, match="face.eot_batch"):
        FacePlan.from_mapping({"eot_batch": 0}, 0)


def test_progress_read_late_stops_where_a_per_step_read_does(
    faces: torch.Tensor, recognizer: FaceRecognizer, gallery: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the losses are read every few steps; an early stop found late rolls back to its step."""
    base = dodging_loss(recognizer, gallery, 0)
    calls: list[int] = []

    def counted(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return base(x, index)

    runs = {}
    for every in (1, 7):
        monkeypatch.setattr(patch_engine, "_read_every", lambda device, every=every: every)
        calls.clear()
        found = optimise_patch(
            counted, faces[:1], make_mask("eyeglasses"), _digital(steps=40), modules=[recognizer.embedder]
        )
        runs[every] = (found, len(calls))
    (per_step, per_step_calls), (late, late_calls) = runs[1], runs[7]
    assert per_step.steps < 40, "the case must stop early"
    assert late_calls > per_step_calls, "the late reader ran steps past the stop"
    assert (late.steps, late.history, late.success_history) == (
        per_step.steps,
        per_step.history,
        per_step.success_history,
    )
    assert torch.equal(late.patch, per_step.patch)


#: Tensor calls that make the host wait for a GPU: reading a value back, or nonzero's output size.
_HOST_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero", "cpu", "numpy"}


class _HostReads(TorchFunctionMode):
    """Counts the host reads (:data:`_HOST_READS`) of the torch calls made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.count += getattr(func, "__name__", "") in _HOST_READS
        return func(*args, **(kwargs or {}))


def test_steps_read_nothing_back_between_progress_reads(
    faces: torch.Tensor, recognizer: FaceRecognizer, gallery: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU every host read stalls it: a physical step with TV and NPS reads nothing back; the
    progress is read every 5 steps here (the old loop read the loss and success rate every step)."""
    monkeypatch.setattr(patch_engine, "_read_every", lambda device: 5)
    physical = {"variation": PhysicalVariation(), "tv_weight": 0.1, "nps_weight": 0.1}
    reads = {}
    for steps in (10, 20):
        with _HostReads() as counter:
            settings = _digital(steps=steps, early_stop_patience=99, **physical)
            found = attack_face(recognizer, faces[:1], gallery, 0, 1, make_mask("eyeglasses"), settings)
        assert found.steps == steps
        reads[steps] = counter.count
    assert reads[20] - reads[10] == 2, f"host reads for 10 and 20 steps: {reads}"


def test_adam_optimizer(faces: torch.Tensor, recognizer: FaceRecognizer, gallery: torch.Tensor) -> None:
    result = attack_face(
        recognizer,
        faces[:1],
        gallery,
        1,
        None,
        make_mask("sticker"),
        _digital(optimizer="adam", step_size=0.05, steps=15),
    )
    assert result.history[-1] < result.history[0]


def test_classifier_patch_lowers_accuracy() -> None:
    torch.manual_seed(0)
    # global max pooling: like a trained CNN, a local salient feature can take over the decision
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 4, bias=False),
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    x = F.interpolate(
        torch.rand(16, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        y = model(x).argmax(1)  # the model is right on every image before the patch
    mask = make_mask("sticker", 32, center=(0.5, 0.5), extent=(0.3, 0.3))
    settings = PatchSettings(
        steps=40, eot_samples=16, step_size=8 / 255, variation=PhysicalVariation.identity()
    )
    result = optimise_patch(classifier_patch_loss(model, y), x, mask, settings)  # the loss carries its model
    with torch.no_grad():
        patched = model(apply_patch(x, result.patch, mask, None, PhysicalVariation.identity())).argmax(1)
        noisy = model(
            apply_patch(x, random_patch_baseline(mask), mask, None, PhysicalVariation.identity())
        ).argmax(1)
    accuracy = float((patched == y).float().mean())
    assert accuracy <= 0.5 and accuracy < float((noisy == y).float().mean())
    # restored to its original (training) mode, parameters still trainable, no gradient accumulated
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    # targeted ("toaster") universal patch
    target = int((y + 1).mode().values)
    targeted = optimise_patch(classifier_patch_loss(model, y, target), x, mask, settings, modules=[model])
    with torch.no_grad():
        hits = (
            model(apply_patch(x, targeted.patch, mask, None, PhysicalVariation.identity())).argmax(1)
            == target
        )
    assert float(hits.float().mean()) >= 0.5


def test_patch_to_image() -> None:
    mask = make_mask("sticker")
    patch = torch.zeros(3, SIZE, SIZE)  # black patch
    image = patch_to_image(patch, mask)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert (image[0, 0] == 255).all() and (image[93, 75] == 0).all()  # white paper, black ink
    rgba = patch_to_image(patch, mask, transparent=True)
    assert rgba.shape == (SIZE, SIZE, 4) and rgba[0, 0, 3] == 0 and rgba[93, 75, 3] == 255
