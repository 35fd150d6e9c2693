"""Fetch one pinned npm package tarball, verify it, keep only the files we need, build it into place.

Why one mechanism: face-api (:mod:`robustcnn.models.face.assets`) and the human-models recognizers
(:mod:`robustcnn.models.face.human_assets`) are both published as npm tarballs; each is pinned by
the tarball's sha256, extracted member by member (regular files under ``package/`` only, through
tarfile's 'data' filter), then finished by a package-specific ``build`` step (a weight conversion, a
NOTICE). The folder is assembled in a temporary sibling and renamed into place, so it exists only
when complete: a killed fetch leaves nothing half-made. Machines without the registry pass the
tarball made elsewhere by ``npm pack NAME@VERSION`` (``robustcnn assets --tarball FILE``).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from robustcnn.errors import AssetError
from robustcnn.hashing import file_sha256

ASSETS_ENV = "ROBUSTCNN_ASSETS_DIR"


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package: what to download, what to keep, when its folder is complete.

    ``members``: glob patterns of the paths kept (inside the tarball's ``package/``); ``required``: the
    patterns that must match something, else the tarball is not this package; ``complete``: paths
    that exist only in a finished folder; ``build(staged folder)``: the package's last step.
    """

    name: str
    version: str
    sha256: str
    folder: str
    members: tuple[str, ...]
    required: tuple[str, ...]
    complete: tuple[str, ...]
    build: Callable[[Path], None]
    tarball_flag: str = "--tarball"

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def fix_hint(self) -> str:
        return (
            f"run `robustcnn assets` (needs node/npm and the npm registry; or `robustcnn assets "
            f"{self.tarball_flag} FILE` with the .tgz from `npm pack {self.spec}` made elsewhere), "
            f"or set {ASSETS_ENV}"
        )


def assets_dir(path: str | Path | None = None) -> Path:
    """Where assets live: ``path`` > $ROBUSTCNN_ASSETS_DIR > $XDG_CACHE_HOME/robustcnn/assets (~/.cache)."""
    if path is not None and str(path):
        return Path(path).expanduser()
    env = os.environ.get(ASSETS_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "robustcnn" / "assets"


def is_complete(package: NpmPackage, folder: Path) -> bool:
    return all((folder / path).exists() for path in package.complete)


def package_dir(package: NpmPackage, path: str | Path | None = None, what: str = "") -> Path:
    """The package's finished folder; AssetError naming the folder and the fix when it is missing."""
    folder = assets_dir(path) / package.folder
    if not is_complete(package, folder):
        raise AssetError(
            f"the {what or package.name} assets are missing: {folder} does not exist or is incomplete; "
            f"{package.fix_hint()}"
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


def _npm_pack(package: NpmPackage, npm: str, workdir: Path) -> Path:
    """Download the pinned tarball with ``npm pack`` into ``workdir``; AssetError with npm's own last line."""
    exe = shutil.which(npm)
    if exe is None:
        raise AssetError(
            f"`{npm}` (node's package manager) is not installed or not on PATH; {package.fix_hint()}"
        )
    command = [exe, "pack", package.spec, "--pack-destination", str(workdir)]
    run_fetcher(command, workdir, f"npm pack {package.spec}", package.fix_hint())
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise AssetError(f"`npm pack {package.spec}` produced no tarball in {workdir}; {package.fix_hint()}")
    return tarballs[0]


def _wanted(package: NpmPackage, name: str) -> bool:
    """Is tarball member ``name`` one we keep?"""
    if not name.startswith("package/"):
        return False
    inner = name[len("package/") :]
    return any(fnmatch.fnmatchcase(inner, pattern) for pattern in package.members)


def _extract(package: NpmPackage, tarball: Path, dest: Path) -> None:
    """Extract the kept members (regular files only, under ``package/``) with tarfile's 'data' filter."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _wanted(package, m.name)]
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"cannot extract {tarball} ({exc}); fetch the tarball again") from exc
    inner = dest / "package"
    if not inner.is_dir():
        raise AssetError(f"{tarball} holds none of the files we need: not {package.spec}")
    for entry in inner.iterdir():
        entry.rename(dest / entry.name)
    inner.rmdir()
    for pattern in package.required:
        if not list(dest.glob(pattern)):
            raise AssetError(f"{tarball} lacks {pattern}: it is not {package.spec}")


def _verified_source(package: NpmPackage, tarball: str | Path | None, npm: str, work: Path) -> Path:
    """The tarball (downloaded into ``work`` when not given), refused unless its sha256 is the pinned one."""
    source = _npm_pack(package, npm, work) if tarball is None else Path(tarball).expanduser()
    digest = file_sha256(source)
    if digest != package.sha256:
        raise AssetError(
            f"{source} has sha256 {digest}, expected {package.sha256} ({package.spec}); "
            "refusing a different or damaged tarball"
        )
    return source


def fetch_npm_package(
    package: NpmPackage,
    dest: str | Path | None = None,
    tarball: str | Path | None = None,
    npm: str = "npm",
    force: bool = False,
) -> Path:
    """Fetch (or take ``tarball``), verify, extract and build ``package``; return its folder.

    Idempotent: an existing complete folder is returned at once (no npm) unless ``force``.
    A tarball whose sha256 differs from the pinned one is refused (AssetError naming both hashes).
    """
    root = assets_dir(dest)
    final = root / package.folder
    if is_complete(package, final) and not force:
        return final
    if tarball is not None and not Path(tarball).expanduser().is_file():
        raise AssetError(
            f"tarball {tarball} does not exist; make it with `npm pack {package.spec}` on a machine "
            "with the npm registry"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{package.folder}.tmp-", dir=root))
    except OSError as exc:
        raise AssetError(
            f"cannot create the assets folder {root} ({exc}); set {ASSETS_ENV} to a writable folder"
        ) from exc
    try:
        source = _verified_source(package, tarball, npm, work)
        staged = work / package.folder
        staged.mkdir()
        _extract(package, source, staged)
        package.build(staged)
        if final.exists():
            if not force and is_complete(package, final):
                return final  # another fetch finished first: keep its folder
            final.rename(work / "previous")
        try:
            staged.rename(final)
        except OSError:
            if not is_complete(package, final):  # else a concurrent fetch renamed its copy in first: use it
                raise
    except OSError as exc:
        raise AssetError(
            f"cannot write the {package.name} assets into {root} ({exc}); {package.fix_hint()}"
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
