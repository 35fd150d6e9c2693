"""Fetching dataset files: urllib download with md5 check, and tar extraction that cannot escape.

Why here and not in each dataset: both steps are security relevant (a download must be verified
before it is used; an archive member like ``../../.bashrc`` must never be written), so they live in
one small module with one behaviour. Every failure is a :class:`DataError` that says how to put the
file in place by hand, because the typical failure is an offline machine.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath

from robustcnn.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
#: Seconds to wait for the server before giving up (per socket operation, not the whole transfer).
TIMEOUT_S = 60.0


def md5_of(path: Path) -> str:
    """md5 hex digest of a file, read in chunks (md5 is what the dataset authors publish)."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, *, md5: str, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` and verify its md5; nothing is left at ``dest`` unless it matches.

    Writes to ``dest.part`` first and renames at the end, so an interrupted download never looks
    like a complete file.
    """
    dest = Path(dest)
    manual = f"download {url} on a machine with internet access and copy it to {dest}"
    if not url.startswith(("https://", "http://")):
        raise DataError(f"refusing to download from {url!r}: only http(s) URLs are used")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create {dest.parent} for the download ({exc.strerror or exc}); "
            "choose a writable data.root"
        ) from exc
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s -> %s", url, dest)
    request = urllib.request.Request(url, headers={"User-Agent": "robustcnn"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, part.open("wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"could not download {url} ({reason}); is this machine offline? Either retry when "
            f"online, or {manual}"
        ) from exc
    if digest.hexdigest() != md5.lower():
        part.unlink(missing_ok=True)
        raise DataError(
            f"downloaded {url} but its md5 is {digest.hexdigest()}, expected {md5}: the file is "
            f"damaged or was changed upstream. Retry, or {manual}"
        )
    os.replace(part, dest)
    return dest


def ensure_file(url: str, dest: Path, *, md5: str) -> Path:
    """``dest`` if it exists with the right md5, else a fresh verified download."""
    dest = Path(dest)
    if dest.is_file():
        if md5_of(dest) == md5.lower():
            return dest
        log.warning("%s has the wrong md5; downloading it again", dest)
    return download_file(url, dest, md5=md5)


def _unsafe_reason(member: tarfile.TarInfo, dest: Path) -> str | None:
    name = member.name
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return "absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "'..' in path"
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder (link or device)"
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        return "path outside the target folder"
    return None


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a (compressed) tar into ``dest`` after checking *every* member first.

    Refuses the whole archive (extracting nothing) if any member has an absolute path, ``..``, or is
    a link or device: a tampered archive must not be able to write outside ``dest``. On Pythons that
    have it, tarfile's own ``data`` filter is applied as a second line of defence.
    """
    archive, dest = Path(archive), Path(dest).resolve()
    fix = f"delete {archive} and download it again from the official URL"
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe_reason(member, dest)
                if reason is not None:
                    raise DataError(
                        f"refusing to extract {archive}: member {member.name!r} is unsafe "
                        f"({reason}); the archive is not the official one, {fix}"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were vetted above
                tar.extractall(dest, members=members)  # noqa: S202
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {archive} ({exc}); {fix}") from exc
