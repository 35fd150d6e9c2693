"""The embedded real-face gallery (``data=faces``) and a user's identity folders (``data=face_folder``).

Tests that read face-api's demo photos skip when the assets are not fetched, unless
ROBUSTCNN_REQUIRE_ASSETS=1 (then they fail); everything else runs offline on matplotlib's
grace_hopper.jpg and synthetic images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from face_assets import require_face_assets
from PIL import Image

from robustcnn.errors import AssetError, DataError
from robustcnn.face.crops import CROP_SIZE, crop_face
from robustcnn.face.gallery import (
    GALLERY_JSON,
    JITTERS,
    detect_faces,
    fit_square,
    gallery_photo_paths,
    genuine_jitter_pairs,
    jitter_box,
    load_face_folder,
    load_face_gallery,
    read_gallery_boxes,
    read_rgb,
)


@pytest.fixture(scope="module")
def face_api() -> Path:
    """The fetched face-api folder (and photos), or a skip (a failure under ROBUSTCNN_REQUIRE_ASSETS=1)."""
    return Path(require_face_assets())


@pytest.fixture(scope="module")
def gallery(face_api: Path):
    return load_face_gallery(face_api)


def _grace_hopper() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """matplotlib's portrait and its reviewed face box (needs no fetched assets)."""
    document = read_gallery_boxes()
    (photo,) = [p for p in document["photos"] if p["image"] == "grace_hopper.jpg"]
    import matplotlib.cbook

    image = read_rgb(Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return image, tuple(photo["boxes"][0])


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------------------------------
# The boxes file and the detector


def test_boxes_file_is_complete_and_in_bounds() -> None:
    document = json.loads(GALLERY_JSON.read_text())
    assert "tools/detect_faces.py" in document["note"]
    names = [p["image"] for p in document["photos"]]
    people = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"]
    assert names == people + [f"sample{i}.jpg" for i in range(1, 7)] + ["grace_hopper.jpg"]
    named = {p["image"]: p.get("identities") for p in document["photos"]}
    assert [named[n] for n in people] == [["obama"], ["obama"], ["obama"], ["biden"]]
    for photo in document["photos"]:
        assert len(photo["sha256"]) == 64 and int(photo["sha256"], 16) >= 0
        width, height = photo["size"]
        assert photo["boxes"], f"{photo['image']} has no reviewed face"
        for x, y, w, h in photo["boxes"]:
            assert w > 20 and h > 20 and 0 <= x + w / 2 < width and 0 <= y + h / 2 < height
        assert len(photo["aligned_boxes"]) == len(photo["boxes"])
        for (x, y, w, h), (ax, ay, aw, ah) in zip(photo["boxes"], photo["aligned_boxes"], strict=True):
            assert aw == ah > 20  # face-api's own box is square
            assert x <= ax + aw / 2 <= x + w and y <= ay + ah / 2 <= y + h  # the same face


def test_detector_refinds_the_reviewed_box_on_grace_hopper() -> None:
    image, stored = _grace_hopper()
    boxes = detect_faces(image)
    assert boxes, "the Haar cascades lost Grace Hopper's face"
    x, y, w, h = boxes[0]
    sx, sy, sw, sh = stored
    inter = max(0, min(x + w, sx + sw) - max(x, sx)) * max(0, min(y + h, sy + sh) - max(y, sy))
    assert inter / (w * h + sw * sh - inter) > 0.7


def test_detector_finds_nothing_on_a_blank_image_and_rejects_bad_arrays() -> None:
    assert detect_faces(np.full((200, 200, 3), 128, dtype=np.uint8)) == []
    with pytest.raises(DataError, match="RGB uint8"):
        detect_faces(np.zeros((50, 50), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------
# The embedded gallery


def test_gallery_loads_deterministically(face_api: Path, gallery) -> None:
    again = load_face_gallery(face_api)
    assert again.crops.tobytes() == gallery.crops.tobytes()
    assert again.identity == gallery.identity
    n = sum(len(p["boxes"]) for p in read_gallery_boxes()["photos"])
    assert len(gallery) == n >= 20
    assert gallery.crops.shape == (n, CROP_SIZE, CROP_SIZE, 3) and gallery.crops.dtype == np.uint8
    images = gallery.images
    assert images.shape == (n, 3, CROP_SIZE, CROP_SIZE) and images.dtype.is_floating_point
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    # three real photos of one person (genuine pairs, held-out photos), every other face its own identity
    assert gallery.identities[:4] == ["obama", "obama", "obama", "biden"]
    assert len(set(gallery.identities)) == n - 2 and "grace_hopper" in gallery.identities
    assert "sample1_face0" in gallery.identities
    assert gallery.identity["count"] == n and len(gallery.identity["boxes_sha256"]) == 16
    assert sorted(set(gallery.labels.tolist())) == list(range(n - 2))
    assert [s.image for s in gallery.sources].count("grace_hopper.jpg") == 1


def test_gallery_margin_changes_the_crops(face_api: Path, gallery) -> None:
    tight = load_face_gallery(face_api, margin=0.5)
    assert tight.crops.shape == gallery.crops.shape and not np.array_equal(tight.crops, gallery.crops)
    assert tight.identity["crops_sha256"] != gallery.identity["crops_sha256"]


def test_gallery_with_face_api_aligned_boxes(face_api: Path, gallery) -> None:
    aligned = load_face_gallery(face_api, margin=0.0, boxes="aligned")
    assert aligned.crops.shape == gallery.crops.shape and aligned.identities == gallery.identities
    assert aligned.identity["boxes"] == "aligned" and gallery.identity["boxes"] == "haar"
    assert all(s.box[2] == s.box[3] for s in aligned.sources)
    with pytest.raises(DataError, match="haar, aligned"):
        load_face_gallery(face_api, boxes="landmarks")


def test_tampered_photo_is_refused(face_api: Path, tmp_path: Path) -> None:
    demo = tmp_path / "face-api" / "demo"
    demo.mkdir(parents=True)
    for source in sorted((face_api / "demo").glob("sample*.jpg")):
        (demo / source.name).symlink_to(source)
    (demo / "sample3.jpg").unlink()
    data = bytearray((face_api / "demo" / "sample3.jpg").read_bytes())
    data[-10] ^= 0xFF
    (demo / "sample3.jpg").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"sample3\.jpg.*sha256.*restore"):
        load_face_gallery(tmp_path / "face-api")


def test_missing_photo_is_an_asset_error(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    with pytest.raises(AssetError, match=r"sample1\.jpg"):
        gallery_photo_paths(tmp_path)


def test_missing_people_photos_name_the_fetch(face_api: Path, tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"obama\.jpg is missing; run `robustcnn assets`"):
        gallery_photo_paths(face_api, photos=tmp_path)


def test_a_boxes_file_naming_too_few_people_is_refused(face_api: Path, tmp_path: Path, monkeypatch) -> None:
    from robustcnn.face import gallery as gallery_module

    document = read_gallery_boxes()
    document["photos"][0]["identities"] = ["obama", "someone"]  # two names for one box
    broken = tmp_path / "boxes.json"
    broken.write_text(json.dumps(document))
    monkeypatch.setattr(gallery_module, "GALLERY_JSON", broken)
    with pytest.raises(DataError, match=r"names \['obama', 'someone'\] for the 1 box\(es\) of obama\.jpg"):
        load_face_gallery(face_api)


def test_jitter_box_moves_and_scales_about_the_centre() -> None:
    assert jitter_box((100, 200, 40, 40), 0.05, 0.0, 0.0) == (102, 200, 40, 40)
    assert jitter_box((100, 200, 40, 40), 0.0, -0.05, 0.0) == (100, 198, 40, 40)
    assert jitter_box((100, 200, 40, 40), 0.0, 0.0, 0.1) == (98, 198, 44, 44)


def test_genuine_jitter_pairs_are_aligned_and_close(face_api: Path, gallery) -> None:
    jitters = JITTERS[::3]  # two of them (a shift and a scale) keep the test fast
    a, b, names = genuine_jitter_pairs(face_api, jitters=jitters)
    k = len(jitters)
    assert a.shape == b.shape == (len(gallery) * k, 3, CROP_SIZE, CROP_SIZE)
    assert names[::k] == gallery.identities
    assert np.array_equal((a[::k] * 255).round().byte().permute(0, 2, 3, 1).numpy(), gallery.crops)
    differences = (a - b).abs().flatten(1).mean(1)
    assert float(differences.min()) > 0.0  # every jitter moves the crop
    assert float(differences.max()) < 0.25


# --------------------------------------------------------------------------------------------------
# A user's identity folders


def test_face_folder_precropped_faces_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    faces = {
        "alice": [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(3)],
        "bob": [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)],
        "carol": [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(2)],
    }
    for person, crops in faces.items():
        for i, crop in enumerate(crops):
            _save(tmp_path / person / f"{i}.png", crop)
    (tmp_path / "alice" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    loaded = load_face_folder(tmp_path, detect=False)
    assert loaded.identities == ["alice"] * 3 + ["bob"] + ["carol"] * 2
    expected = np.stack([c for person in ("alice", "bob", "carol") for c in faces[person]])
    assert np.array_equal(loaded.crops, expected)  # a 150x150 crop is taken as is
    assert loaded.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert loaded.identity["identities"] == 3 and loaded.identity["count"] == 6
    assert loaded.sources[3].image == os.path.join("bob", "0.png")
    capped = load_face_folder(tmp_path, detect=False, max_per_identity=1)
    assert capped.identities == ["alice", "bob", "carol"]


def test_face_folder_pads_non_square_precropped_faces(tmp_path: Path) -> None:
    _save(tmp_path / "dan" / "wide.jpg", np.full((60, 120, 3), 200, dtype=np.uint8))
    _save(tmp_path / "eve" / "tall.png", np.full((90, 30, 3), 90, dtype=np.uint8))
    loaded = load_face_folder(tmp_path, detect=False)
    assert loaded.crops.shape == (2, 150, 150, 3)
    assert loaded.crops[0, 0].max() == 0 and loaded.crops[0, 75].min() > 150  # black bars, face centred
    assert loaded.crops[1, :, 0].max() == 0 and loaded.crops[1, 75, 75].min() > 60


def test_face_folder_detects_a_face_padded_into_a_larger_photo(tmp_path: Path) -> None:
    image, box = _grace_hopper()
    face = crop_face(image, box, margin=1.0)  # 150x150, the face is its central ~75 px
    photo = np.full((320, 420, 3), 110, dtype=np.uint8)
    photo[120:270, 200:350] = face
    _save(tmp_path / "grace" / "party.png", photo)
    _save(tmp_path / "grace" / "portrait.png", fit_square(image))
    loaded = load_face_folder(tmp_path, detect=True)
    assert loaded.identities == ["grace", "grace"] and loaded.crops.shape == (2, 150, 150, 3)
    # the face box is the central half of the pasted 150 px crop: (237.5, 157.5, 75, 75) in the photo
    x, y, w, h = loaded.sources[0].box
    iw = max(0, min(x + w, 312.5) - max(x, 237.5))
    ih = max(0, min(y + h, 232.5) - max(y, 157.5))
    assert iw * ih / (w * h + 75 * 75 - iw * ih) > 0.5, loaded.sources[0].box


@pytest.mark.parametrize(
    ("build", "kwargs", "message"),
    [
        (lambda root: None, {}, "does not exist"),
        (lambda root: root.mkdir(), {}, "no identity sub-folders"),
        (lambda root: _save(root / "loose.png", np.zeros((8, 8, 3), np.uint8)), {}, "1 loose image"),
        (lambda root: (root / "frank").mkdir(parents=True), {}, r"frank holds no images"),
        (
            lambda root: ((root / "gina").mkdir(parents=True), (root / "gina" / "x.jpg").write_bytes(b"no")),
            {},
            r"cannot read image .*x\.jpg",
        ),
        (
            lambda root: _save(root / "hal" / "wall.png", np.full((200, 200, 3), 128, np.uint8)),
            {"detect": True},
            r"no face detected in .*wall\.png: pass a tighter photo or a pre-cropped face",
        ),
        (
            lambda root: _save(root / "ivy" / "a.png", np.zeros((8, 8, 3), np.uint8)),
            {"max_per_identity": 0},
            "max_per_identity",
        ),
        (
            lambda root: _save(root / "jo" / "a.png", np.zeros((8, 8, 3), np.uint8)),
            {"margin": -1.0},
            "margin",
        ),
    ],
    ids=["missing", "empty", "loose", "no-images", "unreadable", "no-face", "max0", "margin"],
)
def test_face_folder_bad_inputs_name_the_problem(tmp_path: Path, build, kwargs, message) -> None:
    root = tmp_path / "faces"
    build(root)
    with pytest.raises(DataError, match=message):
        load_face_folder(root, **kwargs)
