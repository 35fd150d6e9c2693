"""A small reader for the IDX format that MNIST and Fashion-MNIST ship in (gzipped or not).

Why our own: it is 20 lines of numpy, needs no torchvision, and lets a truncated or wrong file fail
with a message that names it instead of a reshape error. Format: two zero bytes, a type code, the
number of dimensions, then one big-endian uint32 per dimension and the data, row-major.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from robustcnn.errors import DataError

#: IDX type code -> numpy dtype (multi-byte types are big-endian on disk).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc.strerror or exc}; check that it exists and is readable"
        ) from exc
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path} is a damaged gzip file ({exc}); delete it and put an intact copy there "
            "(or download it again)"
        ) from exc


def parse_idx(data: bytes, *, source: str = "<bytes>", expected_ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes into a read-only numpy array in native byte order.

    Raises :class:`DataError` naming ``source`` for a bad magic number, an unexpected number of
    dimensions, or a size that does not match the header.
    """
    fix = "delete it and put an intact copy of the original file there (or download it again)"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); {fix}")
    dtype = IDX_TYPES[data[2]]
    ndim = data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"{source} holds a {ndim}-d IDX array, expected {expected_ndim}-d (magic "
            f"{data[:4].hex()}); is it the right file? {fix}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source} is truncated inside its IDX header; {fix}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{source} has {len(data) - header} data bytes but its header {dims} needs "
            f"{expected}; the file is truncated or damaged, {fix}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
        array.flags.writeable = False
    return array


def read_idx(path: Path, *, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a read-only numpy array."""
    return parse_idx(read_bytes(path), source=str(path), expected_ndim=expected_ndim)
