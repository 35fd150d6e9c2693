"""One rule for tests that need the fetched face-api assets (`robustcnn assets`).

Without them such a test skips, naming the fix; with ROBUSTCNN_REQUIRE_ASSETS=1 (set by `make test`,
which fetches them first, as in CI) it fails instead, so CI can never pass by skipping the face tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from robustcnn.errors import AssetError


def require_face_assets() -> Path:
    """The fetched face-api folder, or a skip (a failure under ROBUSTCNN_REQUIRE_ASSETS=1)."""
    from robustcnn.models.face.assets import face_api_dir

    try:
        return face_api_dir()
    except AssetError as exc:
        if os.environ.get("ROBUSTCNN_REQUIRE_ASSETS") == "1":
            pytest.fail(f"face-api assets required (ROBUSTCNN_REQUIRE_ASSETS=1) but unavailable: {exc}")
        pytest.skip(f"face-api assets not fetched ({exc})")
