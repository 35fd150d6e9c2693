"""Build tests/fixtures/face_api_reference.json: descriptors of real face crops from the ORIGINAL face-api.

Why: the torch port (robustcnn.models.face.network) is only trustworthy if it gives the descriptors
face-api's own JavaScript gives. This script cuts crops from the package's demo photos with the shared
crop rule (robustcnn.face.crops.crop_face), runs tools/face_api_reference/describe.js on them under
node (tfjs 4.22.0, pure-JS CPU backend), and stores per crop: the photo, its sha256, the box, the sha256
of the uint8 crop bytes and the JS descriptor. No image bytes go into the fixture.

Usage (needs node/npm and the npm registry, ~1 minute):

    .venv/bin/python tools/make_face_fixture.py [--tarball vladmandic-face-api-1.7.15.tgz] [--workdir DIR]

The boxes were picked with OpenCV's Haar cascade (haarcascade_frontalface_default.xml, scaleFactor 1.1,
minNeighbors 8, minSize 40) on demo/sample1..6.jpg, keeping the detections that are faces (checked by
eye); they are listed below so the fixture does not depend on OpenCV's version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustcnn.face.crops import CROP_SIZE, DEFAULT_MARGIN, crop_face  # noqa: E402
from robustcnn.hashing import file_sha256  # noqa: E402
from robustcnn.models.face.assets import (  # noqa: E402
    FACE_API_PACKAGE,
    FACE_API_SHA256,
    FACE_API_VERSION,
    face_api_dir,
    fetch_face_api,
)

REFERENCE_DIR = ROOT / "tools" / "face_api_reference"
FIXTURE = ROOT / "tests" / "fixtures" / "face_api_reference.json"

#: (demo photo, Haar box [x, y, w, h]) of every face crop in the fixture.
FACES: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("sample1.jpg", (366, 365, 242, 242)),
    ("sample2.jpg", (1404, 164, 246, 246)),
    ("sample3.jpg", (1015, 209, 315, 315)),
    ("sample3.jpg", (551, 339, 251, 251)),
    ("sample3.jpg", (1482, 313, 249, 249)),
    ("sample4.jpg", (928, 193, 241, 241)),
    ("sample5.jpg", (1087, 216, 190, 190)),
    ("sample5.jpg", (777, 121, 205, 205)),
    ("sample5.jpg", (641, 457, 161, 161)),
    ("sample5.jpg", (357, 897, 237, 237)),
    ("sample6.jpg", (1447, 283, 267, 267)),
    ("sample6.jpg", (1147, 330, 256, 256)),
    ("sample6.jpg", (617, 347, 258, 258)),
    ("sample6.jpg", (246, 511, 254, 254)),
)
#: (demo photo, region [x, y, w, h]) cut as-is, not square and not 150 px: face-api pads and resizes
#: these itself, which checks robustcnn.models.face.network.to_face_input against the original.
RAW_REGIONS: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("sample4.jpg", (898, 143, 301, 361)),  # taller than wide: padded left and right
    ("sample5.jpg", (1047, 186, 271, 229)),  # wider than tall: padded top and bottom
    ("sample1.jpg", (400, 400, 121, 120)),  # odd difference: uneven padding, upscaled
)


def read_rgb(path: Path) -> np.ndarray:
    """A photo as RGB uint8 [H, W, 3] with EXIF rotation applied (as robustcnn.face.gallery reads photos)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def sha256_bytes(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def build_crops(folder: Path) -> tuple[list[dict], list[np.ndarray]]:
    """Fixture entries (without descriptors) and the uint8 [H, W, 3] arrays, in the same order."""
    photos = {name: read_rgb(folder / "demo" / name) for name, _ in FACES + RAW_REGIONS}
    entries, arrays = [], []
    for name, box in FACES:
        crop = crop_face(photos[name], box, margin=DEFAULT_MARGIN)
        entries.append({"kind": "crop", "image": name, "box": list(box), "crop_sha256": sha256_bytes(crop)})
        arrays.append(crop)
    for name, (x, y, w, h) in RAW_REGIONS:
        region = np.ascontiguousarray(photos[name][y : y + h, x : x + w])
        entries.append(
            {"kind": "region", "image": name, "box": [x, y, w, h], "crop_sha256": sha256_bytes(region)}
        )
        arrays.append(region)
    return entries, arrays


def prepare_node(workdir: Path, tarball: Path) -> None:
    """Scratch node project: the pinned tfjs from npm, and face-api (full package) from the tarball."""
    shutil.copy(REFERENCE_DIR / "package.json", workdir / "package.json")
    shutil.copy(REFERENCE_DIR / "describe.js", workdir / "describe.js")
    if not (workdir / "node_modules" / "@tensorflow" / "tfjs" / "package.json").is_file():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=workdir, check=True
        )
    target = workdir / "node_modules" / "@vladmandic" / "face-api"
    if not (target / "package.json").is_file():
        extract = workdir / "face-api-package"
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(extract, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        (extract / "package").rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, default=None, help="face-api .tgz (default: npm pack it)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch node folder to keep and reuse")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()

    folder = fetch_face_api(tarball=args.tarball) if args.tarball else face_api_dir_or_fetch()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="face-api-reference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tarball = args.tarball
    if tarball is None:
        subprocess.run(
            ["npm", "pack", f"{FACE_API_PACKAGE}@{FACE_API_VERSION}", "--pack-destination", str(workdir)],
            cwd=workdir, check=True, capture_output=True,
        )  # fmt: skip
        tarball = next(workdir.glob("*.tgz"))
    if file_sha256(tarball) != FACE_API_SHA256:
        raise SystemExit(f"{tarball} is not {FACE_API_PACKAGE}@{FACE_API_VERSION} (sha256 differs)")
    prepare_node(workdir, tarball)

    entries, arrays = build_crops(folder)
    (workdir / "crops.u8").write_bytes(b"".join(a.tobytes() for a in arrays))
    (workdir / "shapes.json").write_text(json.dumps([list(a.shape[:2]) for a in arrays]))
    subprocess.run(
        ["node", "describe.js", str(workdir / "node_modules" / "@vladmandic" / "face-api"),
         "crops.u8", "shapes.json", "descriptors.json"],
        cwd=workdir, check=True,
    )  # fmt: skip
    result = json.loads((workdir / "descriptors.json").read_text())
    for entry, descriptor in zip(entries, result["descriptors"], strict=True):
        entry["descriptor"] = [float(f"{v:.9g}") for v in descriptor]
    images = sorted({e["image"] for e in entries})
    fixture = {
        "about": "descriptors by the original face-api JS code; regenerate with tools/make_face_fixture.py",
        "source": {
            "package": FACE_API_PACKAGE,
            "version": FACE_API_VERSION,
            "tarball_sha256": FACE_API_SHA256,
        },
        "reference": {
            "runtime": "node "
            + subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            "tfjs": result["tfjs_version"],
            "backend": result["backend"],
            "seconds_per_crop": round(result["seconds_per_crop"], 3),
        },
        "crop_rule": {
            "function": "robustcnn.face.crops.crop_face",
            "margin": DEFAULT_MARGIN,
            "size": CROP_SIZE,
        },
        "image_sha256": {name: file_sha256(folder / "demo" / name) for name in images},
        "crops": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{args.out}: {len(entries)} crops, {result['seconds_per_crop']:.2f} s per crop in JS")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def face_api_dir_or_fetch() -> Path:
    """The assets folder, fetched with npm first if missing."""
    from robustcnn.errors import AssetError

    try:
        return face_api_dir()
    except AssetError:
        return fetch_face_api()


if __name__ == "__main__":
    main()
