"""Fetch and verify real photos of the same people: the test photos of PyPI's face_recognition 1.3.0.

Why these: a patch must be judged on a camera photo it was not optimised on, which needs several
photos of one person. The sdist of ``face_recognition`` 1.3.0 (MIT, Adam Geitgey) ships three
different photos of one person (``obama.jpg``, ``obama2.jpg``, ``obama3.jpg``) and one of another
(``biden.jpg``) in ``tests/test_images``; it installs from PyPI through pip like any package and is
pinned here by its sha256, as face-api's npm tarball is (:mod:`robustcnn.models.face.assets`).
``obama_partial_face*.jpg`` (crops of ``obama.jpg``) and ``32bit.png`` (``obama2.jpg`` as a PNG) are
left out: they are the same photos, and a copy of a photo is never a held-out photo.

Layout: ``<assets_dir>/face_recognition-1.3.0/`` holds ``test_images/<photo>``, LICENSE and NOTICE;
built in a temporary sibling and renamed into place, so it exists only when complete.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from robustcnn.errors import AssetError
from robustcnn.hashing import file_sha256
from robustcnn.models.face.assets import assets_dir, run_fetcher

PHOTOS_PACKAGE = "face_recognition"
PHOTOS_VERSION = "1.3.0"
#: sha256 of ``face_recognition-1.3.0.tar.gz`` as ``pip download --no-binary :all:`` fetches it from PyPI.
PHOTOS_SHA256 = "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"
PHOTOS_FOLDER = f"{PHOTOS_PACKAGE}-{PHOTOS_VERSION}"
#: The distinct photos kept (file names in the sdist's ``tests/test_images``).
PHOTO_NAMES = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def _fix_hint() -> str:
    return (
        "run `robustcnn assets` (needs pip and PyPI; or `robustcnn assets --photos-sdist FILE` with the "
        f"file `pip download --no-deps --no-binary :all: {PHOTOS_PACKAGE}=={PHOTOS_VERSION}` made elsewhere)"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / "NOTICE").is_file() and all((folder / "test_images" / n).is_file() for n in PHOTO_NAMES)


def photos_dir(path: str | Path | None = None) -> Path:
    """The extracted photo folder; AssetError naming the folder and the fix when it is missing."""
    folder = assets_dir(path) / PHOTOS_FOLDER
    if not _is_complete(folder):
        raise AssetError(
            f"the face_recognition test photos are missing: {folder} does not exist or is incomplete; "
            f"{_fix_hint()}"
        )
    return folder


def _pip_download(workdir: Path) -> Path:
    """The pinned sdist from PyPI via pip (no wheel, no dependencies); AssetError with pip's last line."""
    spec = f"{PHOTOS_PACKAGE}=={PHOTOS_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec]
    run_fetcher([*command, "-d", str(workdir)], workdir, f"pip download {spec}", _fix_hint())
    found = sorted(workdir.glob(f"{PHOTOS_FOLDER}.tar.gz"))
    if len(found) != 1:
        raise AssetError(f"`pip download {spec}` left no {PHOTOS_FOLDER}.tar.gz in {workdir}; {_fix_hint()}")
    return found[0]


def _extract(sdist: Path, dest: Path) -> None:
    """The kept photos and the licence (regular files only) with tarfile's 'data' filter."""
    wanted = {f"{PHOTOS_FOLDER}/tests/test_images/{n}": f"test_images/{n}" for n in PHOTO_NAMES}
    wanted[f"{PHOTOS_FOLDER}/LICENSE"] = "LICENSE"
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name in wanted]
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"cannot extract {sdist} ({exc}); fetch it again") from exc
    for inner, target in wanted.items():
        source = dest / inner
        if not source.is_file():
            raise AssetError(f"{sdist} lacks {inner}: it is not {PHOTOS_PACKAGE} {PHOTOS_VERSION}")
        (dest / target).parent.mkdir(parents=True, exist_ok=True)
        source.rename(dest / target)
    shutil.rmtree(dest / PHOTOS_FOLDER)


def _write_notice(folder: Path) -> None:
    licence = (folder / "LICENSE").read_text(encoding="utf-8", errors="replace")
    (folder / "NOTICE").write_text(
        f"test_images/ ({', '.join(PHOTO_NAMES)}) are unmodified files of tests/test_images in the PyPI\n"
        f"sdist {PHOTOS_FOLDER}.tar.gz (sha256 {PHOTOS_SHA256}),\n"
        "https://github.com/ageitgey/face_recognition, distributed under the MIT licence below.\n\n"
        + licence,
        encoding="utf-8",
    )


def fetch_photos(
    dest: str | Path | None = None, sdist: str | Path | None = None, force: bool = False
) -> Path:
    """Fetch (or take ``sdist``), verify, extract the photos and the licence; return their folder.

    Idempotent: an existing complete folder is returned at once unless ``force``. An sdist whose
    sha256 differs from :data:`PHOTOS_SHA256` is refused (AssetError naming both hashes).
    """
    root = assets_dir(dest)
    final = root / PHOTOS_FOLDER
    if _is_complete(final) and not force:
        return final
    if sdist is not None and not Path(sdist).expanduser().is_file():
        raise AssetError(f"sdist {sdist} does not exist; {_fix_hint()}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{PHOTOS_FOLDER}.tmp-", dir=root))
    except OSError as exc:
        raise AssetError(f"cannot create the assets folder {root} ({exc}); set ROBUSTCNN_ASSETS_DIR") from exc
    try:
        source = _pip_download(work) if sdist is None else Path(sdist).expanduser()
        digest = file_sha256(source)
        if digest != PHOTOS_SHA256:
            raise AssetError(
                f"{source} has sha256 {digest}, expected {PHOTOS_SHA256} ({PHOTOS_FOLDER}.tar.gz); "
                "refusing a different or damaged sdist"
            )
        staged = work / PHOTOS_FOLDER
        staged.mkdir()
        _extract(source, staged)
        _write_notice(staged)
        if final.exists():
            final.rename(work / "previous")
        staged.rename(final)
    except OSError as exc:
        raise AssetError(f"cannot write the face photos into {root} ({exc}); {_fix_hint()}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
