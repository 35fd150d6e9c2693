"""``cifar10``: CIFAR-10 (50,000 / 10,000, 3x32x32) from the official *binary* release.

Why the binary release: the usual ``cifar-10-python.tar.gz`` stores the images as pickles, and
unpickling a downloaded file can run arbitrary code. The binary version
(``cifar-10-binary.tar.gz`` -> ``cifar-10-batches-bin/``) is plain fixed-size records: one label
byte then 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major). Nothing here
ever unpickles anything.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from robustcnn.data.base import Dataset, build_dataset
from robustcnn.data.download import ensure_file, safe_extract_tar
from robustcnn.data.registry import register_dataset
from robustcnn.data.validate import check_bool, check_root
from robustcnn.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD_BYTES = 1 + 3 * 32 * 32


def read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc.strerror or exc}; check that it exists and is readable"
        ) from exc
    fix = f"replace it with the file from {URL} (the binary version)"
    if not data or len(data) % RECORD_BYTES:
        raise DataError(
            f"{path} is {len(data)} bytes, not a whole number of {RECORD_BYTES}-byte CIFAR-10 "
            f"records; it is truncated or not a CIFAR-10 binary batch, {fix}"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASS_NAMES):
        raise DataError(
            f"{path} has label {labels.max()} (CIFAR-10 labels are 0..9); is it a CIFAR-100 or "
            f"other file? {fix}"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


def _paths(root: Path) -> list[Path]:
    return [root / FOLDER / name for name in (*TRAIN_FILES, *TEST_FILES)]


def _download(root: Path) -> None:
    if all(p.is_file() for p in _paths(root)):
        return
    archive = ensure_file(URL, root / ARCHIVE, md5=MD5)
    safe_extract_tar(archive, root)


def _missing_error(root: Path, missing: list[Path]) -> DataError:
    listed = ", ".join(str(p) for p in missing)  # one line: the CLI prints errors as one line
    hint = ""
    if (root / "cifar-10-batches-py").is_dir():
        hint = (
            f" (Found {root / 'cifar-10-batches-py'}: that is the pickled Python version, which "
            "robustcnn never loads because unpickling can run code.)"
        )
    return DataError(
        f"dataset 'cifar10': {len(missing)} file(s) missing under {root / FOLDER}: {listed}.{hint} "
        f"Download the CIFAR-10 *binary* version {URL} and extract it into {root} (it creates {FOLDER}/), "
        "set data.root to the folder that holds it, or pass download=True (data.download=true) to fetch "
        "it when online."
    )


@lru_cache(maxsize=2)
def _parse(stamp: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read all six batches; ``stamp`` = (path, size, mtime) per file so edits invalidate the cache."""
    batches = [read_cifar_bin(Path(path)) for path, _, _ in stamp]
    n_train = len(TRAIN_FILES)
    x_train = np.concatenate([b[0] for b in batches[:n_train]])
    y_train = np.concatenate([b[1] for b in batches[:n_train]])
    x_test = np.concatenate([b[0] for b in batches[n_train:]])
    y_test = np.concatenate([b[1] for b in batches[n_train:]])
    for array in (x_train, y_train, x_test, y_test):
        array.flags.writeable = False
    return x_train, y_train, x_test, y_test


@register_dataset("cifar10")
def cifar10(root: str = "data", download: bool = False) -> Dataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`` (official split)."""
    folder = check_root(root)
    if check_bool(download, "download"):
        _download(folder)
    paths = _paths(folder)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _missing_error(folder, missing)
    stamp = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    x_train, y_train, x_test, y_test = _parse(stamp)
    return build_dataset(
        "cifar10",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=CLASS_NAMES,
        identity={"source": f"CIFAR-10 binary version ({ARCHIVE}, official split)", "source_url": URL},
    )
