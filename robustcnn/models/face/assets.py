"""Fetch, verify and convert the pretrained face assets (npm package @vladmandic/face-api 1.7.15).

Why npm: the package (MIT) is where face-api's weights and sample photos are published, pinned by
version and checked here by the tarball's sha256, so every machine converts the very same bytes.
Machines without node or without the registry can use a tarball made elsewhere with
``npm pack @vladmandic/face-api@1.7.15`` (``robustcnn assets --tarball FILE``). The download,
verification and extraction are :mod:`robustcnn.models.face.npm_package`'s.

Layout: ``<assets_dir>/face-api-1.7.15/`` holds the needed files of the package (model/, demo/
sample photos, LICENSE, package.json), the converted ``face_recognition.safetensors`` with a sha256
sidecar, and NOTICE. The folder is built in a temporary sibling and renamed into place, so it exists
only when complete: a killed fetch leaves nothing half-made.
"""

from __future__ import annotations

from pathlib import Path

from robustcnn.models.face.npm_package import (
    NpmPackage,
    assets_dir,
    fetch_npm_package,
    package_dir,
    run_fetcher,
)

__all__ = ["assets_dir", "face_api_dir", "fetch_face_api", "run_fetcher"]

FACE_API_PACKAGE = "@vladmandic/face-api"
FACE_API_VERSION = "1.7.15"
#: sha256 of the tarball `npm pack @vladmandic/face-api@1.7.15` downloads from the npm registry.
FACE_API_SHA256 = "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031"
#: Folder name of the extracted, converted package inside the assets folder.
FACE_API_FOLDER = f"face-api-{FACE_API_VERSION}"
#: Package members we keep (paths inside the tarball's ``package/``): the recognizer, the 68-point
#: landmark net (for face alignment), the demo photos (real faces for tests and the study), the licence.
FACE_API_MEMBERS = (
    "model/face_recognition_model*",
    "model/face_landmark_68_model*",
    "demo/sample*.jpg",
    "LICENSE",
    "package.json",
)
WEIGHTS_FILE = "face_recognition.safetensors"


def _build(folder: Path) -> None:
    """Convert the recognizer's weights to safetensors and write the NOTICE (MIT licence, provenance)."""
    from robustcnn.models.face.convert import convert_face_api

    convert_face_api(
        folder / "model",
        folder / WEIGHTS_FILE,
        metadata={"source": f"{FACE_API_PACKAGE}@{FACE_API_VERSION}", "source_sha256": FACE_API_SHA256},
    )
    licence = (folder / "LICENSE").read_text(encoding="utf-8", errors="replace")
    (folder / "NOTICE").write_text(
        f"{WEIGHTS_FILE} is converted (by robustcnn.models.face.convert) from\n"
        "model/face_recognition_model.bin "
        f"of the npm package {FACE_API_PACKAGE}@{FACE_API_VERSION} (tarball sha256 {FACE_API_SHA256}),\n"
        "https://github.com/vladmandic/face-api, distributed under the MIT licence below.\n\n" + licence,
        encoding="utf-8",
    )


def face_api_package() -> NpmPackage:
    """face-api's pinned package (built at call time, so the pinned sha256 can be patched in tests)."""
    return NpmPackage(
        name=FACE_API_PACKAGE,
        version=FACE_API_VERSION,
        sha256=FACE_API_SHA256,
        folder=FACE_API_FOLDER,
        members=FACE_API_MEMBERS,
        required=("model/face_recognition_model*", "LICENSE"),
        complete=(WEIGHTS_FILE, "model"),
        build=_build,
    )


def face_api_dir(path: str | Path | None = None) -> Path:
    """The extracted, converted face-api folder; AssetError naming the folder and the fix when missing."""
    return package_dir(face_api_package(), path, what="face-api")


def fetch_face_api(
    dest: str | Path | None = None, tarball: str | Path | None = None, npm: str = "npm", force: bool = False
) -> Path:
    """Fetch (or take ``tarball``), verify, extract and convert face-api; return its folder.

    Idempotent: an existing complete folder is returned at once (no npm) unless ``force``.
    A tarball whose sha256 differs from FACE_API_SHA256 is refused (AssetError naming both hashes).
    """
    return fetch_npm_package(face_api_package(), dest, tarball, npm, force)
