"""The real photos of the same people (PyPI face_recognition 1.3.0's test photos): fetched through pip,
pinned by the sdist's sha256, extracted with their licence, and a clear error when missing or wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from face_assets import write_tarball

from robustcnn.errors import AssetError
from robustcnn.models.face import photo_assets
from robustcnn.models.face.photo_assets import PHOTO_NAMES, PHOTOS_FOLDER, fetch_photos, photos_dir


def _sdist(path: Path, extra: tuple[str, ...] = ("32bit.png", "obama_partial_face.jpg")) -> Path:
    """A stand-in sdist with the real layout: the kept photos, copies that must be left out, the licence."""
    files = {
        **{f"tests/test_images/{n}": n.encode() for n in (*PHOTO_NAMES, *extra)},
        "LICENSE": b"MIT License\nCopyright (c) 2017, Adam Geitgey\n",
        "setup.py": b"print('never run')\n",
    }
    return write_tarball(path, {f"{PHOTOS_FOLDER}/{name}": data for name, data in files.items()})


def test_a_pinned_sdist_gives_the_photos_and_the_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdist = _sdist(tmp_path / f"{PHOTOS_FOLDER}.tar.gz")
    monkeypatch.setattr(photo_assets, "PHOTOS_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    folder = fetch_photos(tmp_path / "assets", sdist=sdist)
    assert folder == photos_dir(tmp_path / "assets")
    assert sorted(p.name for p in (folder / "test_images").iterdir()) == sorted(PHOTO_NAMES)  # no copies
    notice = (folder / "NOTICE").read_text()
    assert "MIT" in notice and "Adam Geitgey" in notice and photo_assets.PHOTOS_SHA256 in notice
    assert fetch_photos(tmp_path / "assets", sdist=tmp_path / "not-read.tar.gz") == folder  # idempotent


def test_a_different_sdist_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    sdist = _sdist(tmp_path / f"{PHOTOS_FOLDER}.tar.gz")
    with pytest.raises(AssetError, match=r"sha256 .*expected 5e5efdd1.*refusing"):
        fetch_photos(tmp_path / "assets", sdist=sdist)
    assert list((tmp_path / "assets").iterdir()) == []
    with pytest.raises(AssetError, match=r"face_recognition test photos are missing.*robustcnn assets"):
        photos_dir(tmp_path / "assets")
    with pytest.raises(AssetError, match="does not exist"):
        fetch_photos(tmp_path / "assets", sdist=tmp_path / "nope.tar.gz")
