"""Fetch, verify and convert the pretrained face assets (npm package @vladmandic/face-api 1.7.15).

Why npm: the package (MIT) is where face-api's weights and sample photos are published, pinned by
version and checked here by the tarball's sha256, so every machine converts the very same bytes.
Machines without node or without the registry can use a tarball made elsewhere with
``npm pack @vladmandic/face-api@1.7.15`` (``robustcnn assets --tarball FILE``).

Layout: ``<assets_dir>/face-api-1.7.15/`` holds the needed files of the package (model/, demo/
sample photos, LICENSE, package.json), the converted ``face_recognition.safetensors`` with a sha256
sidecar, and NOTICE. The folder is built in a temporary sibling and renamed into place, so it exists
only when complete: a killed fetch leaves nothing half-made.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from robustcnn.errors import AssetError
from robustcnn.hashing import file_sha256

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
_ENV = "ROBUSTCNN_ASSETS_DIR"


def _fix_hint() -> str:
    return (
        "run `robustcnn assets` (needs node/npm and the npm registry; or `robustcnn assets --tarball FILE` "
        f"with the .tgz from `npm pack {FACE_API_PACKAGE}@{FACE_API_VERSION}` made elsewhere), "
        f"or set {_ENV}"
    )


def assets_dir(path: str | Path | None = None) -> Path:
    """Where assets live: ``path`` > $ROBUSTCNN_ASSETS_DIR > $XDG_CACHE_HOME/robustcnn/assets (~/.cache)."""
    if path is not None and str(path):
        return Path(path).expanduser()
    env = os.environ.get(_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "robustcnn" / "assets"


def _is_complete(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / "model").is_dir()


def face_api_dir(path: str | Path | None = None) -> Path:
    """The extracted, converted face-api folder; AssetError naming the folder and the fix when missing."""
    folder = assets_dir(path) / FACE_API_FOLDER
    if not _is_complete(folder):
        raise AssetError(
            f"the face-api assets are missing: {folder} does not exist or is incomplete; {_fix_hint()}"
        )
    return folder


def run_fetcher(command: list[str], workdir: Path, shown: str, hint: str) -> None:
    """Run a package client (npm, pip) in ``workdir``; AssetError with its own last error line and the fix."""
    try:
        proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"`{shown}` failed to run ({exc}); {hint}") from exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise AssetError(f"`{shown}` failed: {last}; {hint}")


def _npm_pack(npm: str, workdir: Path) -> Path:
    """Download the pinned tarball with ``npm pack`` into ``workdir``; AssetError with npm's own last line."""
    exe = shutil.which(npm)
    if exe is None:
        raise AssetError(f"`{npm}` (node's package manager) is not installed or not on PATH; {_fix_hint()}")
    spec = f"{FACE_API_PACKAGE}@{FACE_API_VERSION}"
    command = [exe, "pack", spec, "--pack-destination", str(workdir)]
    run_fetcher(command, workdir, f"npm pack {spec}", _fix_hint())
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise AssetError(f"`npm pack {spec}` produced no tarball in {workdir}; {_fix_hint()}")
    return tarballs[0]


def _wanted(name: str) -> str | None:
    """The path inside the package of a tarball member we keep, else None."""
    if not name.startswith("package/"):
        return None
    inner = name[len("package/") :]
    return inner if any(fnmatch.fnmatchcase(inner, pattern) for pattern in FACE_API_MEMBERS) else None


def _extract(tarball: Path, dest: Path) -> None:
    """Extract the kept members (regular files only, under ``package/``) with tarfile's 'data' filter."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name)]
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"cannot extract {tarball} ({exc}); fetch the tarball again") from exc
    package = dest / "package"
    if not package.is_dir():
        raise AssetError(f"{tarball} holds no face-api files: not {FACE_API_PACKAGE}@{FACE_API_VERSION}")
    for entry in package.iterdir():
        entry.rename(dest / entry.name)
    package.rmdir()
    for pattern in ("model/face_recognition_model*", "LICENSE"):
        if not list(dest.glob(pattern)):
            raise AssetError(f"{tarball} lacks {pattern}: it is not {FACE_API_PACKAGE}@{FACE_API_VERSION}")


def _write_notice(folder: Path) -> None:
    licence = (folder / "LICENSE").read_text(encoding="utf-8", errors="replace")
    (folder / "NOTICE").write_text(
        f"{WEIGHTS_FILE} is converted (by robustcnn.models.face.convert) from\n"
        "model/face_recognition_model.bin "
        f"of the npm package {FACE_API_PACKAGE}@{FACE_API_VERSION} (tarball sha256 {FACE_API_SHA256}),\n"
        "https://github.com/vladmandic/face-api, distributed under the MIT licence below.\n\n" + licence,
        encoding="utf-8",
    )


def fetch_face_api(
    dest: str | Path | None = None, tarball: str | Path | None = None, npm: str = "npm", force: bool = False
) -> Path:
    """Fetch (or take ``tarball``), verify, extract and convert face-api; return its folder.

    Idempotent: an existing complete folder is returned at once (no npm) unless ``force``.
    A tarball whose sha256 differs from FACE_API_SHA256 is refused (AssetError naming both hashes).
    """
    from robustcnn.models.face.convert import convert_face_api

    root = assets_dir(dest)
    final = root / FACE_API_FOLDER
    if _is_complete(final) and not force:
        return final
    if tarball is not None and not Path(tarball).expanduser().is_file():
        raise AssetError(
            f"tarball {tarball} does not exist; make it with `npm pack {FACE_API_PACKAGE}@"
            f"{FACE_API_VERSION}` on a machine with the npm registry"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{FACE_API_FOLDER}.tmp-", dir=root))
    except OSError as exc:
        raise AssetError(
            f"cannot create the assets folder {root} ({exc}); set {_ENV} to a writable folder"
        ) from exc
    try:
        if tarball is None:
            source = _npm_pack(npm, work)
        else:
            source = Path(tarball).expanduser()
        digest = file_sha256(source)
        if digest != FACE_API_SHA256:
            raise AssetError(
                f"{source} has sha256 {digest}, expected {FACE_API_SHA256} "
                f"({FACE_API_PACKAGE}@{FACE_API_VERSION}); refusing a different or damaged tarball"
            )
        staged = work / FACE_API_FOLDER
        staged.mkdir()
        _extract(source, staged)
        convert_face_api(
            staged / "model",
            staged / WEIGHTS_FILE,
            metadata={"source": f"{FACE_API_PACKAGE}@{FACE_API_VERSION}", "source_sha256": FACE_API_SHA256},
        )
        _write_notice(staged)
        if final.exists():
            if not force and _is_complete(final):
                return final  # another fetch finished first: keep its folder
            final.rename(work / "previous")
        try:
            staged.rename(final)
        except OSError:
            if not _is_complete(final):  # else a concurrent fetch renamed its copy in first: use it
                raise
    except OSError as exc:
        raise AssetError(f"cannot write the face-api assets into {root} ({exc}); {_fix_hint()}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
