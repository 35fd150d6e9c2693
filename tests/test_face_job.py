"""The face patch study as a job: results, artifacts, MLflow, resume, and every bad input a user can
give it (one clear error before any work). Real weights and photos: `robustcnn assets` (CI fetches
them; without them these tests skip, or fail under ROBUSTCNN_REQUIRE_ASSETS=1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from face_assets import require_face_assets
from PIL import Image
from test_cli import robustcnn

from robustcnn.config import compose
from robustcnn.errors import AssetError, ConfigError, DataError, RobustCNNError
from robustcnn.face.settings import check_face_config, select_identities
from robustcnn.jobs.dispatch import check_config, run_job
from robustcnn.jobs.inputs import to_container
from robustcnn.tracking.store import TrackingStore

#: A face study in seconds: one attacker, one impersonation target, a few steps and held-out draws.
TINY_FACE = [
    "experiment=face_smoke",
    "face.attackers=1",
    "face.targets=2",
    "face.steps=3",
    "face.eot_samples=2",
    "face.eval_draws=4",
]


def face_config(*overrides: str) -> dict:
    return to_container(compose([*TINY_FACE, *overrides]))


def test_tiny_face_study_writes_results_artifacts_and_a_run(isolated: dict) -> None:
    require_face_assets()
    out = isolated["root"] / "out"
    results = run_job(compose(TINY_FACE), output_dir=out, progress=False)
    for key in ("dodging_success_rate", "impersonation_success_rate", "random_patch_success_rate"):
        assert 0.0 <= results[key] <= 1.0, key
    # the embedded gallery: 26 photos of 24 people, the first with three real photos
    assert results["task"] == "face_patch" and results["identities"] == 24 and results["faces"] == 26
    assert results["attackers"] == ["obama"]
    assert results["targets"] == ["obama", "biden"]
    # the threshold is fitted on impostor pairs of the 22 people outside the study, and the FAR it
    # reports is the one measured on the 91 pairs the fit never saw (3 + 1 photos x 22, and 3 x 1)
    verification = results["verification"]
    assert results["threshold_source"] == "calibrated"
    assert verification["fit"]["pairs"] == 22 * 21 // 2 and verification["held_out"]["pairs"] == 91
    held = verification["held_out"]
    assert results["false_accept_rate"] == verification["false_accept_rate"] == held["false_accepts"] / 91
    low, high = results["false_accept_interval"]
    assert low <= results["false_accept_rate"] <= high
    assert verification["excluded_identities"] == ["biden", "obama"]
    assert verification["genuine_pairs"] == 3 and verification["genuine_source"] == "same-person photo pairs"
    # obama's dodging patch is judged on a photo its optimisation never saw; the impersonation of
    # biden (one photo: his template is what the attack aimed at) only on held-out draws
    split = results["photo_split"]["identities"]["obama"]
    roles = [split["enrolment"], split["optimisation"], split["evaluation"]]
    assert sorted(sum(roles, [])) == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
    dodging, impersonation = results["patches"]
    assert dodging["held_out"] == "photos" and impersonation["held_out"] == "transforms_only"
    assert dodging["held_out_photos"]["n_faces"] == 1 and impersonation["held_out_photos"] is None
    assert results["dodging_success_rate_held_out_photos"] == dodging["held_out_photos"]["success_rate"]
    assert results["held_out"]["dodging_success_rate_held_out_photos"] == "photos"
    assert results["held_out"]["dodging_success_rate"] == "transforms_only"
    assert {(f["goal"], f["held_out"]) for f in results["figures"]} == {
        ("dodging", "transforms_only"), ("dodging", "photos"), ("impersonation", "transforms_only"),
    }  # fmt: skip
    assert dodging["in_sample"]["random_patch"]["seed"] != impersonation["in_sample"]["random_patch"]["seed"]
    assert results["checks"][0]["name"] == "patches_beat_random_baseline"
    # transfer: both patches scored on the recognizers never optimised against, each calibrated apart
    assert results["holdout_recognizers"] == ["faceres", "mobileface"]
    for name in ("faceres", "mobileface"):
        transfer = results["transfer"][name]
        assert transfer["threshold"] != results["threshold"]
        assert transfer["verification"]["held_out"]["pairs"] == 91
        assert dodging["transfer"][name]["held_out"] == "recognizer+photos"
        rate = results[f"transfer_{name}_dodging_held_out_photos_success_rate"]
        assert rate == dodging["transfer"][name]["success_rate"]
        assert 0.0 <= results[f"transfer_{name}_dodging_held_out_photos_random_success_rate"] <= 1.0
    assert 5.5 < results["mask_area_percent"] < 6.5
    matrix = results["impersonation_matrix"]
    assert matrix["success_rate"][0][0] is None and 0.0 <= matrix["success_rate"][0][1] <= 1.0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["mlflow_run_id"] == results["mlflow_run_id"]
    for name in ("adversarial_faces.png", "impersonation_matrix.png", "distance_distributions.png",
                 "face_saliency.png"):  # fmt: skip
        assert (out / name).stat().st_size > 1000, name
    # the recognizer's saliency toward the template each patch is about, on its face without and with it
    assert dodging["saliency"]["template"] == "obama" and impersonation["saliency"]["template"] == "biden"
    for patch in (dodging, impersonation):
        shares = [patch["saliency"][f"{face}_mass_in_patch"] for face in ("clean", "patched")]
        assert all(0.0 < share < 1.0 for share in shares), shares
        assert 0.05 < patch["saliency"]["patch_area_fraction"] < 0.07  # the eyeglass frame's 6%
    assert dodging["saliency"]["photo"] == "held-out"
    assert results["dodging_saliency_in_patch_patched"] == dodging["saliency"]["patched_mass_in_patch"]
    patch_png = Image.open(out / "patches" / "dodging" / "obama.png")
    assert patch_png.mode == "RGBA" and patch_png.size == (150, 150)
    alpha = np.asarray(patch_png)[..., 3]
    assert 5.5 < 100 * (alpha > 0).mean() < 6.5  # opaque exactly on the eyeglass frame
    run = TrackingStore.at(isolated["store"]).read_run(results["mlflow_run_id"])
    assert run["status"] == "FINISHED" and run["tags"]["task"] == "face_patch"
    assert "dodging_success_rate" in run["metrics"] and "verification/calibrated_threshold" in run["metrics"]
    assert {"saliency_in_patch/patched", "impersonation_saliency_in_patch_clean"} <= set(run["metrics"])
    # the same job again is reused, not recomputed
    again = run_job(compose(TINY_FACE), output_dir=isolated["root"] / "again", progress=False)
    assert again["reused_from"] == results["mlflow_run_id"]


def test_identities_by_name_and_unknown_names() -> None:
    names = ["a", "b", "c"]
    assert select_identities(None, names, "face.attackers") == [0, 1, 2]
    assert select_identities(2, names, "face.attackers") == [0, 1]
    assert select_identities(["c", "a"], names, "face.targets") == [2, 0]
    with pytest.raises(ConfigError, match=r"face.targets names \['zed'\].*3 identities \(a, b, c\)"):
        select_identities(["zed"], names, "face.targets")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["face.threshold=-1"], "face.threshold"),
        (["face.threshold=maybe"], "face.threshold"),
        (["face.far=1.5"], "face.far"),
        (["face.steps=0"], "face.steps"),
        (["face.mask=monocle"], "monocle|valid"),
        (["face.mask=sticker", "+face.mask_params.center=[2.0,2.0]"], "empty"),
        (["+face.mask_params.lens_size=3"], "face.mask_params"),
        (["face.variation=wobbly"], "face.variation"),
        (["+face.variation.spin=3"], "spin"),
        (["face.optimizer=sgd"], "optimizer"),
        (["face.attackers=[]"], "face.attackers"),
        (["+face.bogus=1"], "bogus"),
        (["data=mnist5k"], "task=face_patch needs face data"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_face_settings_fail_before_any_work(overrides: list[str], match: str) -> None:
    with pytest.raises(RobustCNNError, match=match):
        check_config(face_config(*overrides), device=False)


def test_a_mask_png_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    png = tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(png)
    with pytest.raises(ConfigError, match="150"):
        check_face_config(face_config(f"face.mask={png}"), device=False)
    square = np.zeros((150, 150), dtype=np.uint8)
    square[60:90, 30:60] = 255  # a 30x30 sticker on the left cheek
    Image.fromarray(square).save(png)
    plan = check_face_config(face_config(f"face.mask={png}"), device=False)
    assert int(plan.mask.sum()) == 900


def test_face_data_in_a_classifier_job_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="task=face_patch"):
        run_job(compose(["data=faces"]), output_dir=None, progress=False)


def test_missing_face_weights_say_how_to_fetch_them(isolated: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTCNN_ASSETS_DIR", str(isolated["root"] / "no-assets"))
    with pytest.raises(AssetError, match="robustcnn assets"):
        run_job(compose(TINY_FACE), output_dir=isolated["root"] / "out", progress=False)
    missing = {"ROBUSTCNN_ASSETS_DIR": "/nonexistent"}
    proc = robustcnn("run", *TINY_FACE, cwd=isolated["root"], env_extra=missing)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("robustcnn: error:")]
    assert len(errors) == 1 and "robustcnn assets" in errors[0] and "Traceback" not in proc.stderr


def test_missing_or_unknown_held_out_recognizers_are_one_clear_error(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robustcnn.errors import ModelError
    from robustcnn.models.face.assets import assets_dir

    folder = require_face_assets().parent
    partial = isolated["root"] / "partial-assets"  # face-api and the photos, not human-models
    partial.mkdir()
    for name in ("face-api-1.7.15", "face_recognition-1.3.0"):
        (partial / name).symlink_to(folder / name)
    monkeypatch.setenv("ROBUSTCNN_ASSETS_DIR", str(partial))
    assert assets_dir() == partial
    with pytest.raises(AssetError, match="human-models recognizer assets are missing.*--human-models"):
        run_job(compose(TINY_FACE), output_dir=isolated["root"] / "out", progress=False)
    monkeypatch.setenv("ROBUSTCNN_ASSETS_DIR", str(folder))
    with pytest.raises(ModelError, match="'arcface' is none of face_api, faceres, mobileface"):
        run_job(compose([*TINY_FACE, "face.holdout_recognizers=[arcface]"]), output_dir=None, progress=False)


def test_a_photo_without_a_face_is_a_clear_error(isolated: dict) -> None:
    root = isolated["root"] / "people"
    for person in ("ann", "bob", "cy"):
        (root / person).mkdir(parents=True)
        Image.fromarray(np.full((120, 120, 3), 128, dtype=np.uint8)).save(root / person / "1.png")
    cfg = compose([*TINY_FACE, "data=face_folder", f"data.root={root}"])
    with pytest.raises(DataError, match="no face detected"):
        run_job(cfg, output_dir=isolated["root"] / "out", progress=False)


def test_face_folder_with_pre_cropped_faces_runs(isolated: dict) -> None:
    require_face_assets()
    from robustcnn.face.gallery import load_face_gallery

    gallery = load_face_gallery(boxes="aligned")
    root = isolated["root"] / "people"
    for i, (crop, name) in enumerate(zip(gallery.crops[:7], gallery.identities[:7], strict=True)):
        person = root / name  # obama's three photos, biden, sample1_face0..2
        person.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(person / f"{i}.png")
    people = ["face.attackers=[obama]", "face.targets=[biden]"]
    cfg = compose([*TINY_FACE, "data=face_folder", f"data.root={root}", "data.detect=false", *people])
    results = run_job(cfg, output_dir=isolated["root"] / "out", progress=False)
    assert results["identities"] == 5 and results["faces"] == 7
    # real same-person pairs (obama's three photos) rather than the re-crop proxy
    assert results["verification"]["genuine_source"] == "same-person photo pairs"
    assert results["verification"]["genuine_pairs"] == 3
    assert results["verification"]["fit"]["pairs"] == 3  # the three people outside the study
    assert results["patches"][0]["held_out"] == "photos"
    # too few people outside the study to fit a threshold on: one clear error, before any patch
    everyone = compose([*TINY_FACE, "data=face_folder", f"data.root={root}", "data.detect=false",
                        "face.attackers=null"])  # fmt: skip
    with pytest.raises(ConfigError, match="outside the study"):
        run_job(everyone, output_dir=isolated["root"] / "out2", progress=False)


@pytest.mark.slow
def test_face_smoke_preset_beats_its_random_baseline(isolated: dict) -> None:
    """The acceptance run: `robustcnn run experiment=face_smoke` (a few minutes on 2 busy cores)."""
    require_face_assets()
    proc = robustcnn("run", "experiment=face_smoke", cwd=isolated["root"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("dodging_success_rate="))
    fields = dict(part.split("=", 1) for part in line.split())
    results = json.loads(Path(fields["results"]).read_text())
    # a real attack and a failing baseline on the same held-out draws (the sanity check of the issue)
    assert results["dodging_success_rate"] >= 0.75
    assert results["random_patch_success_rate"] < 0.1
    assert results["dodging_success_rate"] > results["clean_dodging_success_rate"] + 0.5
    # out of the box: a dodging figure on a photo the optimisation never saw, next to its baselines
    assert fields["held_out"] == "photos" and "dodging_success_rate_held_out_photos" in fields
    dodging, impersonation = results["patches"]
    held = dodging["held_out_photos"]
    assert dodging["held_out"] == "photos" and held["random_patch"]["success_rate"] is not None
    assert dodging["beats_baseline"] == held["beats_baseline"]
    # obama as biden (40 steps) is reported as it lands, and the study check agrees with every patch
    assert impersonation["held_out"] == "transforms_only" and impersonation["held_out_photos"] is None
    (check,) = results["checks"]
    assert check["passed"] == all(p["beats_baseline"] for p in results["patches"])
    assert fields["checks"] == ("passed" if check["passed"] else "failed")
    folder = Path(fields["results"]).parent
    for name in ("adversarial_faces.png", "impersonation_matrix.png", "distance_distributions.png"):
        assert (folder / name).is_file(), name
    assert len(list((folder / "patches").rglob("*.png"))) == 2  # one dodging, one impersonation patch


def test_the_summary_line_says_what_each_rate_held_out() -> None:
    from robustcnn.cli.run import summary_line

    results = {
        "task": "face_patch", "dodging_success_rate": 0.9375, "impersonation_success_rate": 0.25,
        "random_patch_success_rate": 0.0625, "random_impersonation_success_rate": 0.0,
        "dodging_success_rate_held_out_photos": 0.5, "random_dodging_success_rate_held_out_photos": 0.0,
        "impersonation_success_rate_held_out_photos": None, "false_accept_rate": 0.011, "threshold": 0.49,
        "checks": [{"status": "failed"}], "model": "face_api", "data": "faces", "mlflow_run_id": "abc",
        "transfer_faceres_dodging_held_out_photos_success_rate": 0.25,
        "transfer_faceres_dodging_held_out_photos_random_success_rate": 0.125,
        "transfer_faceres_dodging_held_out_photos_clean_success_rate": 0.0,
    }  # fmt: skip
    line = summary_line(results, "out")
    assert line.startswith("dodging_success_rate=0.9375 ")
    before, after = line.split(" held_out=transforms_only ")
    assert "random_impersonation_success_rate=0.0000" in before and "held_out_photos" not in before
    photos, rest = after.split(" held_out=photos ")
    assert photos.split() == [
        "dodging_success_rate_held_out_photos=0.5000", "random_dodging_success_rate_held_out_photos=0.0000"
    ]
    transfer, rest = rest.split(" transfer_held_out=recognizer ")  # each held-out recognizer and baseline
    assert transfer.split() == [
        "transfer_faceres_dodging_held_out_photos_random_success_rate=0.1250",
        "transfer_faceres_dodging_held_out_photos_success_rate=0.2500",
    ]
    assert rest.startswith("false_accept_rate=0.0110 threshold=0.4900 checks=failed model=face_api")
    assert dict(part.split("=", 1) for part in line.split())["held_out"] == "photos"  # the study's own, last
