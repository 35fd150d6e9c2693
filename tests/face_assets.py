"""One rule for tests that need the fetched face assets (`robustcnn assets`: face-api, the
human-models recognizers and the face_recognition test photos of the embedded gallery).

Without them such a test skips, naming the fix; with ROBUSTCNN_REQUIRE_ASSETS=1 (set by `make test`,
which fetches them first, as in CI) it fails instead, so CI can never pass by skipping the face tests.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from robustcnn.errors import AssetError


def require_face_assets() -> Path:
    """The fetched face-api folder (the photos and the held-out recognizers a face study scores on
    fetched too), or a skip (a failure under ROBUSTCNN_REQUIRE_ASSETS=1)."""
    from robustcnn.models.face.assets import face_api_dir
    from robustcnn.models.face.human_assets import human_models_dir
    from robustcnn.models.face.photo_assets import photos_dir

    try:
        photos_dir()
        human_models_dir()
        return face_api_dir()
    except AssetError as exc:
        if os.environ.get("ROBUSTCNN_REQUIRE_ASSETS") == "1":
            pytest.fail(f"face assets required (ROBUSTCNN_REQUIRE_ASSETS=1) but unavailable: {exc}")
        pytest.skip(f"face assets not fetched ({exc})")


def require_human_models() -> Path:
    """The fetched human-models folder (the held-out recognizers), or a skip (a failure under
    ROBUSTCNN_REQUIRE_ASSETS=1)."""
    from robustcnn.models.face.human_assets import human_models_dir

    try:
        return human_models_dir()
    except AssetError as exc:
        if os.environ.get("ROBUSTCNN_REQUIRE_ASSETS") == "1":
            pytest.fail(f"human-models assets required (ROBUSTCNN_REQUIRE_ASSETS=1) but unavailable: {exc}")
        pytest.skip(f"human-models assets not fetched ({exc})")


def write_tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A .tar.gz at ``path`` holding ``files`` (member name -> bytes): stand-ins for fetched packages."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
