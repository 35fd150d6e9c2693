"""Results are reused only when everything that changes them is the same: a job on changed images,
a changed face gallery or changed face weights is recomputed, never linked to the old run
(``reused_from``); the same job on the same inputs is still reused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from face_assets import require_face_assets
from PIL import Image
from safetensors.torch import load_file, save_file
from test_face_job import TINY_FACE
from torch import nn

from robustcnn.config import compose
from robustcnn.data import load_dataset
from robustcnn.hashing import file_sha256
from robustcnn.jobs.dispatch import run_job

#: A classifier job in about a second: lenet5, one epoch on 10 grey 12x12 images, no attacks.
IMAGE_SIZE = 12


def write_image(path: Path, grey: int) -> None:
    """A flat grey BMP: uncompressed, so an edit of its pixels leaves the file's size as it was."""
    Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), color=grey).save(path, format="BMP")


def image_tree(root: Path) -> list[Path]:
    """Two classes of six flat images, each its own grey level (so a pixel tells which file it is)."""
    paths = []
    for c, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            paths.append(root / name / f"{i}.bmp")
            write_image(paths[-1], grey=20 * i + 130 * c)
    return paths


def a_train_image(root: Path, paths: list[Path]) -> Path:
    """A file that lands in the train split: editing it changes what the model learns, not what it is
    tested on (the harder case: the test split's content was always part of the data's identity)."""
    data = load_dataset("image_folder", root=str(root), image_size=[IMAGE_SIZE] * 2, channels=1)
    in_train = {round(float(x[0, 0, 0]) * 255) for x in data.x_train}
    return next(p for p in paths if np.asarray(Image.open(p))[0, 0] in in_train)


def folder_job(root: Path) -> list[str]:
    return [
        "data=image_folder",
        f"data.root={root}",
        f"data.image_size=[{IMAGE_SIZE},{IMAGE_SIZE}]",
        "data.channels=1",
        "data.test_fraction=0.2",
        "training.epochs=1",
        "training.augment.shift=0",
        "attack=[]",
        "tracking.experiment=stale",
    ]


def test_a_changed_image_in_an_image_folder_is_recomputed_not_reused(isolated: dict) -> None:
    root = isolated["root"] / "images"
    paths = image_tree(root)
    first = run_job(compose(folder_job(root)), output_dir=isolated["root"] / "first", progress=False)
    same = run_job(compose(folder_job(root)), output_dir=isolated["root"] / "same", progress=False)
    assert same["reused_from"] == first["mlflow_run_id"], "an unchanged re-run is still reused"

    edited = a_train_image(root, paths)
    size = edited.stat().st_size
    write_image(edited, grey=255)
    assert edited.stat().st_size == size  # same name, same size: only the content tells them apart
    again = run_job(compose(folder_job(root)), output_dir=isolated["root"] / "again", progress=False)
    assert "reused_from" not in again, "a job on changed images was linked to the old results"
    assert again["mlflow_run_id"] != first["mlflow_run_id"]
    on_disk = json.loads((isolated["root"] / "again" / "results.json").read_text())
    assert "reused_from" not in on_disk and on_disk["mlflow_run_id"] == again["mlflow_run_id"]


# -- the face study ------------------------------------------------------------------------------


def face_study_again(isolated: dict, overrides: list[str], change: Callable[[], None]) -> tuple[dict, dict]:
    """(results before, results after) of the same tiny face study around ``change()``."""
    first = run_job(compose([*TINY_FACE, *overrides]), output_dir=None, progress=False)
    assert "reused_from" not in first
    change()
    return first, run_job(compose([*TINY_FACE, *overrides]), output_dir=None, progress=False)


@pytest.mark.slow
def test_a_face_study_after_an_edit_of_the_gallery_file_is_recomputed(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """face_gallery.json (the reviewed boxes the gallery's faces are cropped around) edited."""
    require_face_assets()
    import robustcnn.face.gallery as gallery

    def move_the_first_face_box() -> None:
        document = json.loads(gallery.GALLERY_JSON.read_text())
        box = document["photos"][0]["aligned_boxes"][0]  # data=faces crops around the aligned boxes
        box[0], box[2] = box[0] + 3, box[2] + 3
        edited = isolated["root"] / "face_gallery.json"
        edited.write_text(json.dumps(document))
        monkeypatch.setattr(gallery, "GALLERY_JSON", edited)

    first, again = face_study_again(isolated, [], move_the_first_face_box)
    assert "reused_from" not in again, "a face study on an edited gallery was linked to the old results"
    assert again["mlflow_run_id"] != first["mlflow_run_id"]


@pytest.mark.slow
def test_a_face_study_with_replaced_recognizer_weights_is_recomputed(
    isolated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The face-api weights file replaced (re-converted, or another asset): one weight nudged."""
    from robustcnn.face.gallery import load_face_gallery
    from robustcnn.models.face.assets import WEIGHTS_FILE
    from robustcnn.models.face.human_assets import human_models_dir
    from robustcnn.models.face.photo_assets import photos_dir

    assets = require_face_assets()
    copy = isolated["root"] / "assets" / assets.name
    shutil.copytree(assets, copy)
    photos = photos_dir()
    (copy.parent / photos.name).symlink_to(photos)  # the gallery's other photos, unchanged
    human = human_models_dir()
    (copy.parent / human.name).symlink_to(human)  # the held-out recognizers, unchanged
    monkeypatch.setenv("ROBUSTCNN_ASSETS_DIR", str(copy.parent))
    faces = load_face_gallery(boxes="aligned")
    people = isolated["root"] / "people"
    first_photos = {name: faces.identities.index(name) for name in dict.fromkeys(faces.identities)}
    for name, i in list(first_photos.items())[:5]:  # five people, one pre-cropped face each: seconds
        (people / name).mkdir(parents=True)
        Image.fromarray(faces.crops[i]).save(people / name / "1.png")

    def nudge_a_weight() -> None:
        weights = copy / WEIGHTS_FILE
        state = load_file(str(weights))
        name = sorted(state)[0]
        state[name] = state[name] + 1e-3
        save_file(state, str(weights))
        weights.with_name(WEIGHTS_FILE + ".sha256").write_text(f"{file_sha256(weights)}  {WEIGHTS_FILE}\n")

    folder = ["data=face_folder", f"data.root={people}", "data.detect=false"]
    first, again = face_study_again(isolated, folder, nudge_a_weight)
    assert "reused_from" not in again, "a face study with other weights was linked to the old results"
    assert again["mlflow_run_id"] != first["mlflow_run_id"]


# -- audits ----------------------------------------------------------------------------------------


def save_linear_model(path: Path, seed: int) -> str:
    """A TorchScript linear classifier on 1x28x28 images (its weights drawn from ``seed``); its sha256."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), str(path))
    return file_sha256(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")
def test_an_audit_of_a_replaced_model_file_is_recomputed(isolated: dict) -> None:
    """Audits are keyed by the model file's sha256, never by its path: the same path holding other
    weights gets a new audit, its own run and its own hash in audit.json."""
    from robustcnn.jobs.audit import run_audit

    path = isolated["root"] / "model.pt"
    tiny = ["audit.n_samples=16", "attack=[fgsm]", "audit.white_box_attacks=[fgsm]", "checks.enabled=false"]
    first_sha = save_linear_model(path, seed=0)
    _, first = run_audit(str(path), tiny)
    second_sha = save_linear_model(path, seed=1)
    _, again = run_audit(str(path), tiny)
    assert first["model"]["sha256"] == first_sha != second_sha == again["model"]["sha256"]
    assert "reused_from" not in again and again["mlflow_run_id"] != first["mlflow_run_id"]
    on_disk = json.loads((Path(again["out_dir"]) / "audit.json").read_text())
    assert on_disk["model"]["sha256"] == second_sha
