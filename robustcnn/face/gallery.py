"""Real faces for the face-recognition study: an embedded gallery and a user's identity folders.

Why embedded: a robustness study of a face recognizer needs real faces, offline and reproducible.
The gallery is every face in face-api's six demo photos (shipped with the face-api assets),
matplotlib's bundled portrait of Grace Hopper, and the test photos of PyPI's face_recognition 1.3.0
(three photos of one person, one of another: :mod:`robustcnn.models.face.photo_assets`). The face
boxes were detected once with OpenCV's Haar cascades (``tools/detect_faces.py``), reviewed by eye
(false positives on badges and blinds dropped) and stored with each photo's sha256 in
``face_gallery.json``, so loading the gallery needs no detector and gives the same bytes on every
machine; a photo whose bytes changed is refused rather than silently cropped at the wrong place.

Every face of the demo photos is its own identity (they show different people); the boxes file names
the person of the face_recognition photos (``identities``), so ``obama`` has three real photos: genuine
pairs, and photos a patch can be judged on that its optimisation never saw. :func:`genuine_jitter_pairs`
re-crops each face with a slightly moved box, a proxy for a second photo of the same person. For
more real genuine pairs use :func:`load_face_folder` on a folder per person (e.g. LFW deep-funneled).

Crop geometry matters to this recognizer (measured with the port on the 22 gallery faces, 231 impostor
pairs; fraction of impostor distances below face-api's 0.6 / median): Haar boxes, margin 1.0: 92% /
0.50; margin 0.2: 49% / 0.61; margin 0: 30% / 0.65. face-api's own aligned boxes (``boxes="aligned"``),
margin 0: 6.9% / 0.72, the same as the original JS pipeline on these faces, whose descriptors these
crops reproduce to within 0.02-0.05. Eyes sit at ~0.39 of a Haar box's height, ~0.30 of an aligned one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any  # Any: the JSON boxes file and the data identity

import numpy as np
import torch

from robustcnn.errors import AssetError, DataError
from robustcnn.face.crops import CROP_SIZE, DEFAULT_MARGIN, Box, as_box, crop_face, to_unit_tensor
from robustcnn.models.face.assets import face_api_dir
from robustcnn.models.face.photo_assets import PHOTO_NAMES, photos_dir

if TYPE_CHECKING:
    import cv2

#: The reviewed boxes, shipped inside the package (package data).
GALLERY_JSON = Path(__file__).with_name("face_gallery.json")
#: Image suffixes read from identity folders (PIL decodes them all).
FACE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
#: Two detections overlapping more than this (intersection over union) are the same face.
DEDUPE_IOU = 0.3
#: The Haar cascades whose union finds the most faces on the demo photos (each misses some).
CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
#: Photos are scanned at most this wide/high (detection cost grows with the area; boxes are mapped back).
DETECT_MAX_SIDE = 1024


@dataclass(frozen=True)
class FaceSource:
    """Where one crop came from: the photo's file name and the face box (x, y, w, h) in its pixels."""

    image: str
    box: Box


@dataclass
class FaceGallery:
    """Face crops with one identity label each.

    ``crops`` are uint8 [N, 150, 150, 3] (the bytes the recognizer sees after ``to_unit_tensor``);
    ``images`` gives them as float32 [N, 3, 150, 150] in [0, 1]. ``identity`` pins the gallery for
    logging like a dataset's identity (source, count, hashes of the boxes file and of the crops).
    """

    crops: np.ndarray
    identities: list[str]
    sources: list[FaceSource]
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.crops.shape[0]
        if self.crops.ndim != 4 or self.crops.shape[3] != 3 or self.crops.dtype != np.uint8:
            raise DataError(
                f"face crops must be uint8 [N, H, W, 3], got {self.crops.dtype} {self.crops.shape}"
            )
        if len(self.identities) != n or len(self.sources) != n:
            raise DataError(
                f"{n} face crops but {len(self.identities)} identities / {len(self.sources)} sources"
            )

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @property
    def images(self) -> torch.Tensor:
        """float32 [N, 3, H, W] in [0, 1] (exactly q / 255 of the uint8 crops)."""
        return to_unit_tensor(self.crops)

    @property
    def labels(self) -> torch.Tensor:
        """int64 [N]: index of each crop's identity in ``names`` (sorted identity names)."""
        index = {name: i for i, name in enumerate(self.names)}
        return torch.tensor([index[name] for name in self.identities], dtype=torch.int64)

    @property
    def names(self) -> list[str]:
        """The distinct identity names, sorted."""
        return sorted(set(self.identities))


# --------------------------------------------------------------------------------------------------
# Reading photos


def sha256_file(path: Path) -> str:
    """Full hex sha256 of a file's bytes (the gallery pins each photo by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_rgb(path: Path) -> np.ndarray:
    """A photo as RGB uint8 [H, W, 3], EXIF rotation applied (as a viewer shows it); never pickle."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened).convert("RGB")
            return np.array(upright, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); fix or delete the file") from exc


def fit_square(image: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """An already-cropped face -> uint8 [size, size, 3]: centred in a black square, resized bilinearly.

    Why pad rather than stretch: face-api pads non-square inputs with black, so a pre-cropped face is
    seen the same way as one cut by :func:`crop_face` (which pads outside the photo with zeros).
    """
    h, w = image.shape[:2]
    return crop_face(image, (0, 0, w, h), margin=0.0, size=size)


# --------------------------------------------------------------------------------------------------
# Detection


def _iou(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


@functools.lru_cache(maxsize=1)
def _cascades() -> tuple[cv2.CascadeClassifier, ...]:
    """The Haar cascades, loaded once per process (parsing the XML costs more than scanning a small photo)."""
    try:
        import cv2
        import cv2.data  # the folder of the bundled cascades (cv2's own stubs do not declare it)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "face detection needs OpenCV: pip install 'opencv-python-headless<5', "
            "or pass pre-cropped faces (data.detect=false)"
        ) from exc
    found = []
    for name in CASCADES:
        classifier = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, name))
        if classifier.empty():
            raise DataError(f"OpenCV cannot load its Haar cascade {name}; reinstall opencv-python-headless")
        found.append(classifier)
    return tuple(found)


def _rotate(grey: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """``grey`` rotated by ``angle`` degrees on a canvas that holds all of it, and the inverse map."""
    import cv2

    h, w = grey.shape
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(round(h * sin + w * cos)), int(round(h * cos + w * sin))
    matrix[0, 2] += new_w / 2.0 - w / 2.0
    matrix[1, 2] += new_h / 2.0 - h / 2.0
    rotated = cv2.warpAffine(grey, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderValue=0)
    return rotated, cv2.invertAffineTransform(matrix)


def detect_faces(
    image: np.ndarray, min_size: int = 40, min_neighbors: int = 5, angles: tuple[float, ...] = (0.0,)
) -> list[Box]:
    """Frontal face boxes (x, y, w, h) in ``image`` (RGB uint8 [H, W, 3]), largest first.

    The union of two Haar cascades (each misses faces the other finds), duplicates merged by IoU
    (the larger box kept). ``min_size`` is the smallest face side in the photo's pixels. ``angles``
    (degrees) also scans rotated copies, for tilted heads; a face found there is returned as the
    upright square of the same side around its centre. Haar cascades are crude (frontal faces only,
    some false positives): the embedded gallery's boxes were reviewed by eye, and a user's photos
    should show one clear face each.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"detect_faces needs an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    cascades = _cascades()
    import cv2

    scale = min(1.0, DETECT_MAX_SIDE / max(image.shape[:2]))
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    small = max(8, int(round(min_size * scale)))
    candidates: list[Box] = []
    for angle in angles:
        scan, inverse = _rotate(grey, angle) if angle else (grey, None)
        for cascade in cascades:
            found = cascade.detectMultiScale(
                scan, scaleFactor=1.1, minNeighbors=min_neighbors, minSize=(small, small)
            )
            for x, y, w, h in np.asarray(found, dtype=np.float64).reshape(-1, 4):
                cx, cy = x + w / 2.0, y + h / 2.0
                if inverse is not None:
                    cx, cy = inverse @ np.array([cx, cy, 1.0])
                side = w / scale
                box = (cx / scale - side / 2.0, cy / scale - side / 2.0, side, h / scale)
                candidates.append(as_box(round(v) for v in box))
    candidates.sort(key=lambda b: (-b[2] * b[3], b[1], b[0]))
    kept: list[Box] = []
    for box in candidates:
        if all(_iou(box, other) <= DEDUPE_IOU for other in kept):
            kept.append(box)
    return kept


# --------------------------------------------------------------------------------------------------
# The embedded gallery

#: Stored in face_gallery.json: how its boxes were made (kept in code so the tool writes the same note).
GALLERY_NOTE = (
    "Face boxes of the embedded gallery (robustcnn.face.gallery.load_face_gallery). Candidates from "
    "tools/detect_faces.py (OpenCV 4 Haar cascades, the union of frontalface_default and "
    "frontalface_alt2 on the photo and on copies rotated by the listed angles, IoU dedupe, photos scanned "
    "at <= 1024 px; see 'detector'), then reviewed by eye on the tool's contact sheets: only real faces "
    "kept ('kept_candidates'; false positives on badges, blinds, clothes and doubled boxes dropped; the "
    "profile face in sample2.jpg is not found by frontal cascades). 'aligned_boxes' (one per kept box): "
    "the square box the original face-api 1.7.15 JS cuts for its descriptor (SSD detection, 68 landmarks, "
    "useDlibAlignment), of the face-api face overlapping the Haar box most (tools/detect_faces.py "
    "--node-modules). Photos are pinned by sha256; a changed photo is refused."
)
#: The photos, in gallery order: (source, file name). face_recognition's photos come first (their people
#: have several photos each, so the first attackers of a study can be judged on held-out photos);
#: face-api demo photos live in <face-api>/demo/.
FACE_RECOGNITION_SOURCE = "face_recognition tests"
GALLERY_PHOTOS = (
    *((FACE_RECOGNITION_SOURCE, name) for name in PHOTO_NAMES),
    *(("face-api demo", f"sample{i}.jpg") for i in range(1, 7)),
    ("matplotlib sample data", "grace_hopper.jpg"),
)


def _face_api_dir() -> Path:
    """The face-api asset folder (its demo photos are the gallery's); says how to fetch it when missing."""
    return Path(face_api_dir())


_ASSETS_HINT = "run `robustcnn assets`"


def _photo_path(source: str, name: str, base: Path | None, photos: Path | None) -> Path:
    """Where one gallery photo lives (the asset folders are looked up only when needed)."""
    import matplotlib.cbook

    if source == "face-api demo":
        return (base if base is not None else _face_api_dir()) / "demo" / name
    if source == FACE_RECOGNITION_SOURCE:
        return (photos if photos is not None else photos_dir()) / "test_images" / name
    return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))


def gallery_photo_paths(
    assets_dir: Path | str | None = None, photos: Path | str | None = None
) -> list[tuple[str, Path]]:
    """(source, path) of every gallery photo, in gallery order; ``assets_dir`` is the face-api folder,
    ``photos`` the face_recognition photo folder (defaults: the fetched assets). The face-api photos
    are checked first, so a missing demo photo is named even where the other assets are missing too."""
    base = Path(assets_dir) if assets_dir is not None else None
    folder = Path(photos) if photos is not None else None
    order = sorted(GALLERY_PHOTOS, key=lambda item: item[0] != "face-api demo")
    found = {}
    for source, name in order:
        path = _photo_path(source, name, base, folder)
        if not path.is_file():
            hint = {"face-api demo": "re-fetch the face-api assets", FACE_RECOGNITION_SOURCE: _ASSETS_HINT}
            raise AssetError(f"gallery photo {path} is missing; {hint.get(source, 'reinstall matplotlib')}")
        found[name] = (source, path)
    return [found[name] for _, name in GALLERY_PHOTOS]


def read_gallery_boxes(path: Path | None = None) -> dict[str, Any]:
    """The reviewed boxes file as a dict (``photos``: image, source, sha256, size, boxes).

    ``path`` defaults to :data:`GALLERY_JSON` as it is when called (not when defined), so the boxes
    a gallery is cropped with and the ``boxes_sha256`` in its identity always come from one file.
    """
    path = path if path is not None else GALLERY_JSON
    try:
        document = json.loads(path.read_text())
        photos = document["photos"]
        for photo in photos:
            _ = photo["image"], photo["sha256"], [tuple(int(v) for v in box) for box in photo["boxes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"the face gallery's boxes file {path} is missing or malformed ({exc}); reinstall robustcnn "
            "or regenerate it with tools/detect_faces.py"
        ) from exc
    return document


#: Which stored boxes the gallery crops around: the reviewed Haar boxes, or face-api's own aligned boxes.
BOX_KINDS = ("haar", "aligned")


@dataclass(frozen=True)
class _GalleryPhoto:
    """One verified gallery photo: its file name, RGB pixels, stored boxes and who each box shows."""

    name: str
    image: np.ndarray
    boxes: list[Box]
    identities: list[str]


def _box_identities(photo: dict[str, Any], count: int) -> list[str]:
    """Who each box shows: the file's ``identities`` (a person on several photos), else one per face."""
    named = photo.get("identities")
    if named is None:
        return [_gallery_identity(Path(photo["image"]).stem, i, count) for i in range(count)]
    if len(named) != count or not all(isinstance(n, str) and n for n in named):
        raise DataError(
            f"the face gallery's boxes file names {named!r} for the {count} box(es) of {photo['image']}; "
            "reinstall robustcnn or regenerate it with tools/detect_faces.py"
        )
    return list(named)


def _verified_photos(assets_dir: Path | str | None, boxes_kind: str = "haar") -> list[_GalleryPhoto]:
    """Every gallery photo with its stored boxes, each photo checked against its sha256."""
    if boxes_kind not in BOX_KINDS:
        raise DataError(f"face gallery boxes must be one of {', '.join(BOX_KINDS)}, got {boxes_kind!r}")
    key = "boxes" if boxes_kind == "haar" else "aligned_boxes"
    document = read_gallery_boxes()
    paths = {path.name: path for _, path in gallery_photo_paths(assets_dir)}
    photos = []
    for photo in document["photos"]:
        name = photo["image"]
        if name not in paths:
            raise DataError(f"face gallery photo {name} is not one of the known photos; reinstall robustcnn")
        path = paths[name]
        actual = sha256_file(path)
        if actual != photo["sha256"]:
            raise DataError(
                f"face gallery photo {path} has sha256 {actual[:16]}..., "
                f"expected {photo['sha256'][:16]}...: the file was modified or replaced; restore the "
                "original (re-fetch the assets with `robustcnn assets --force` or reinstall matplotlib), "
                "since the stored face boxes only fit the original photo"
            )
        if key not in photo:
            raise DataError(
                f"the face gallery's boxes file has no {key} for {name}; use boxes=haar, or regenerate it "
                "with tools/detect_faces.py --node-modules DIR"
            )
        boxes = [as_box(box) for box in photo[key]]
        photos.append(_GalleryPhoto(name, read_rgb(path), boxes, _box_identities(photo, len(boxes))))
    return photos


def _gallery_identity(stem: str, index: int, count: int) -> str:
    """``grace_hopper`` for a single-face portrait, ``sample1_face0`` for faces of the group photos."""
    return stem if count == 1 and not stem.startswith("sample") else f"{stem}_face{index}"


def load_face_gallery(
    assets_dir: Path | str | None = None, margin: float = DEFAULT_MARGIN, boxes: str = "haar"
) -> FaceGallery:
    """The embedded real-face gallery: every reviewed face of the demo photos, one identity each.

    ``assets_dir`` is the face-api folder holding ``demo/sample*.jpg`` (default: the robustcnn
    assets, which raises :class:`~robustcnn.errors.AssetError` when they are not fetched). ``margin``
    is the crop margin of :func:`~robustcnn.face.crops.crop_face`. Identities are named
    ``<photo stem>_face<i>`` (``grace_hopper`` for the single portrait).

    ``boxes="haar"`` crops around the reviewed Haar boxes (forehead to chin, not aligned);
    ``boxes="aligned"`` around the square box face-api itself cuts for its descriptor (its 68 landmarks,
    dlib-style: eyes and mouth at fixed places), computed once by the original face-api code; with
    ``margin=0`` the crops are face-api's own (up to the resize filter), and different people lie
    further apart (see the module notes).
    """
    crops: list[np.ndarray] = []
    identities: list[str] = []
    sources: list[FaceSource] = []
    for photo in _verified_photos(assets_dir, boxes):
        for box, person in zip(photo.boxes, photo.identities, strict=True):
            crops.append(crop_face(photo.image, box, margin=margin))
            identities.append(person)
            sources.append(FaceSource(photo.name, box))
    stacked = np.stack(crops)
    identity = {
        "name": "faces",
        "source": "face_recognition 1.3.0 test photos + face-api 1.7.15 demo photos + matplotlib "
        "grace_hopper.jpg",
        "count": len(crops),
        "margin": float(margin),
        "boxes": boxes,
        "boxes_sha256": sha256_file(GALLERY_JSON)[:16],
        "crops_sha256": _short_hash(stacked),
    }
    return FaceGallery(stacked, identities, sources, identity)


#: Box jitters of :func:`genuine_jitter_pairs`: (dx, dy, ds): the box moved by dx, dy of its width and
#: height and its side scaled by 1 + ds about its centre (a detector's typical frame-to-frame wobble).
JITTERS = (
    (0.05, 0.0, 0.0),
    (-0.05, 0.0, 0.0),
    (0.0, 0.05, 0.0),
    (0.0, -0.05, 0.0),
    (0.0, 0.0, 0.1),
    (0.0, 0.0, -0.1),
)


def jitter_box(box: Box, dx: float, dy: float, ds: float) -> Box:
    """``box`` moved by (dx * w, dy * h) and scaled by 1 + ``ds`` about its centre (integer pixels)."""
    x, y, w, h = box
    cx, cy = x + w / 2.0 + dx * w, y + h / 2.0 + dy * h
    nw, nh = max(1, int(round(w * (1.0 + ds)))), max(1, int(round(h * (1.0 + ds))))
    return int(round(cx - nw / 2.0)), int(round(cy - nh / 2.0)), nw, nh


def genuine_jitter_pairs(
    assets_dir: Path | str | None = None,
    margin: float = DEFAULT_MARGIN,
    jitters: tuple[tuple[float, float, float], ...] = JITTERS,
    boxes: str = "haar",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Same-face pairs for a genuine-distance proxy: each gallery crop and re-crops with a jittered box.

    Why a proxy: the gallery has one photo per person, so it has no genuine pairs; a box shifted by 5%
    of its side or scaled by +-10% (:data:`JITTERS`: a few to ~30 pixels on these photos) mimics a
    detector's wobble between two photos. It is a lower bound on real same-person distances (same pose,
    light and expression), good for sanity checks and attack baselines, not for a false-reject rate.
    Returns (original [M, 3, 150, 150], jittered [M, 3, 150, 150], identity of each pair), M = N x
    len(jitters), pair k of face i at row i * len(jitters) + k; deterministic (no random draws).
    """
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    names: list[str] = []
    for photo in _verified_photos(assets_dir, boxes):
        for box, person in zip(photo.boxes, photo.identities, strict=True):
            original = crop_face(photo.image, box, margin=margin)
            for dx, dy, ds in jitters:
                first.append(original)
                second.append(crop_face(photo.image, jitter_box(box, dx, dy, ds), margin=margin))
                names.append(person)
    return to_unit_tensor(np.stack(first)), to_unit_tensor(np.stack(second)), names


# --------------------------------------------------------------------------------------------------
# A user's identity folders


def _identity_images(root: Path, person: Path) -> list[Path]:
    files = sorted(
        p
        for p in person.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FACE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(
            f"identity folder {person} holds no images ({', '.join(sorted(FACE_SUFFIXES))}); "
            "add photos of that person or remove the folder"
        )
    return files


def _largest_face(image: np.ndarray, path: Path) -> Box:
    """The largest detected face, searched coarse to fine so that typical portraits stay fast.

    Passes: faces of at least 1/5 of the photo's short side (a portrait or an LFW-style photo, ~4x
    faster), then down to 1/10, then rotated copies (+-15, +-30 degrees) for tilted heads.
    """
    short = min(image.shape[:2])
    for min_size, angles in (
        (short // 5, (0.0,)),
        (short // 10, (0.0,)),
        (short // 10, (-15.0, 15.0, -30.0, 30.0)),
    ):
        boxes = detect_faces(image, angles=angles, min_size=max(20, min_size))
        if boxes:
            return boxes[0]
    raise DataError(
        f"no face detected in {path}: pass a tighter photo or a pre-cropped face "
        "(and data.detect=false to take every photo as an already-cropped face)"
    )


def load_face_folder(
    root: Path | str,
    margin: float = DEFAULT_MARGIN,
    detect: bool = True,
    max_per_identity: int | None = None,
) -> FaceGallery:
    """A user's faces, one identity per sub-folder: ``root/<person>/*.jpg|png`` (e.g. LFW deep-funneled).

    Identities are the sorted sub-folder names; each may hold several photos (genuine pairs).
    ``detect=True`` crops each photo's largest detected face with ``margin`` (as the gallery);
    ``detect=False`` takes each photo as an already-cropped face, padded to a square with black and
    resized to 150 (``margin`` unused). ``max_per_identity`` keeps the first k photos (sorted names) of
    each person. Every problem (missing or empty root, a folder without images, an unreadable photo, a
    photo without a detectable face) is a :class:`~robustcnn.errors.DataError` that names the file.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"face_folder root {root} does not exist or is not a folder; set data.root to a folder with "
            "one sub-folder of photos per person, e.g. lfw-deepfunneled/"
        )
    if max_per_identity is not None and (isinstance(max_per_identity, bool) or int(max_per_identity) < 1):
        raise DataError(f"max_per_identity must be a positive integer or null, got {max_per_identity!r}")
    if margin < 0:
        raise DataError(f"crop margin must be >= 0 (a multiple of the face box side), got {margin}")
    people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in FACE_SUFFIXES]
        hint = f" (it holds {len(loose)} loose image(s): move them into <root>/<person>/)" if loose else ""
        raise DataError(
            f"face_folder root {root} has no identity sub-folders{hint}; put each person's photos in "
            f"their own folder, e.g. {root}/Ada_Lovelace/1.jpg"
        )
    crops: list[np.ndarray] = []
    identities: list[str] = []
    sources: list[FaceSource] = []
    for person in people:
        files = _identity_images(root, person)
        if max_per_identity is not None:
            files = files[: int(max_per_identity)]
        for path in files:
            image = read_rgb(path)
            if detect:
                box = _largest_face(image, path)
                crop = crop_face(image, box, margin=margin)
            else:
                box = (0, 0, int(image.shape[1]), int(image.shape[0]))
                crop = fit_square(image)
            crops.append(crop)
            identities.append(person.name)
            sources.append(FaceSource(str(path.relative_to(root)), box))
    stacked = np.stack(crops)
    identity = {
        "name": "face_folder",
        "source": str(root),
        "count": len(crops),
        "identities": len(people),
        "detect": bool(detect),
        "margin": float(margin) if detect else None,
        "max_per_identity": max_per_identity,
        "crops_sha256": _short_hash(stacked),
    }
    return FaceGallery(stacked, identities, sources, identity)


def _short_hash(array: np.ndarray) -> str:
    from robustcnn.data.base import short_sha256

    return short_sha256(array)
