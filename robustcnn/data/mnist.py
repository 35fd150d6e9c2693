"""``mnist`` and ``fashion_mnist``: the full datasets (60,000 / 10,000) from the standard IDX files.

Files live in ``<root>/MNIST/raw`` and ``<root>/FashionMNIST/raw``, the layout torchvision uses, so
files a user already has can be reused. Each file may be gzipped (``*.gz``, as published) or not.
With ``download=True`` missing files are fetched from the standard mirror and md5-verified; without
it nothing touches the network, and a missing file is a :class:`DataError` that lists the exact paths.
Parsed files are cached in-process, keyed by path, size and mtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from robustcnn.data.base import Dataset, build_dataset
from robustcnn.data.download import ensure_file
from robustcnn.data.idx import read_idx
from robustcnn.data.registry import register_dataset
from robustcnn.data.validate import check_bool, check_root
from robustcnn.errors import DataError

#: (role, file name without .gz)
_ROLES = (
    ("train_images", "train-images-idx3-ubyte"),
    ("train_labels", "train-labels-idx1-ubyte"),
    ("test_images", "t10k-images-idx3-ubyte"),
    ("test_labels", "t10k-labels-idx1-ubyte"),
)


@dataclass(frozen=True)
class IdxSource:
    """Where one MNIST-format dataset lives locally and online."""

    name: str
    folder: str
    mirror: str
    md5: dict[str, str]  # file name without .gz -> md5 of the published .gz
    class_names: tuple[str, ...]


MNIST = IdxSource(
    name="mnist",
    folder="MNIST",
    mirror="https://ossci-datasets.s3.amazonaws.com/mnist/",
    md5={
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    class_names=tuple(str(d) for d in range(10)),
)

FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    folder="FashionMNIST",
    mirror="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    md5={
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
)


def raw_dir(source: IdxSource, root: str | Path) -> Path:
    """``<root>/<MNIST|FashionMNIST>/raw``."""
    return Path(root).expanduser() / source.folder / "raw"


def find_files(source: IdxSource, root: str | Path) -> tuple[dict[str, Path], list[Path]]:
    """(role -> existing path, missing .gz paths); an unzipped copy is preferred (faster to read)."""
    folder = raw_dir(source, root)
    found: dict[str, Path] = {}
    missing: list[Path] = []
    for role, base in _ROLES:
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(folder / f"{base}.gz")
    return found, missing


def _download(source: IdxSource, root: str | Path) -> None:
    folder = raw_dir(source, root)
    for _, base in _ROLES:
        if not (folder / base).is_file():  # an unzipped copy is used as is
            ensure_file(source.mirror + f"{base}.gz", folder / f"{base}.gz", md5=source.md5[base])


def _missing_error(source: IdxSource, root: str | Path, missing: list[Path]) -> DataError:
    folder = raw_dir(source, root)
    listed = ", ".join(str(p) for p in missing)  # one line: the CLI prints errors as one line
    return DataError(
        f"dataset {source.name!r}: {len(missing)} IDX file(s) missing under {folder}: {listed}. "
        f"Put the four files there (gzipped *.gz as published, or unzipped without .gz; an existing "
        f"torchvision {source.folder}/raw folder works), set data.root to the folder that holds "
        f"{source.folder}/, or pass download=True (data.download=true) to fetch them from {source.mirror} "
        "when online."
    )


@lru_cache(maxsize=2)
def _parse(stamp: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, ...]:
    """Parse the four files named in ``stamp`` ((path, size, mtime) each, so edits invalidate)."""
    arrays = []
    for (path, _, _), (role, _) in zip(stamp, _ROLES, strict=True):
        images = role.endswith("images")
        array = read_idx(Path(path), expected_ndim=3 if images else 1)
        if array.dtype != np.uint8:
            raise DataError(
                f"{path} holds {array.dtype} values, MNIST-format files hold uint8; is it the right file?"
            )
        if images and array.shape[1:] != (28, 28):
            raise DataError(f"{path} holds {array.shape[1]}x{array.shape[2]} images, expected 28x28")
        if not images and len(array) and array.max() > 9:
            raise DataError(f"{path} holds labels up to {array.max()}, expected 0..9; is it the right file?")
        arrays.append(array)
    for split, (x, y) in (("train", arrays[0:2]), ("test", arrays[2:4])):
        if len(x) != len(y):
            raise DataError(
                f"the {split} files disagree: {len(x)} images but {len(y)} labels "
                f"({stamp[0 if split == 'train' else 2][0]}); replace them with a matching pair"
            )
    return tuple(arrays)


def load_idx_dataset(source: IdxSource, root: str | Path, download: bool) -> Dataset:
    """Load an MNIST-format dataset (shared by :func:`mnist` and :func:`fashion_mnist`)."""
    root = check_root(root)
    if check_bool(download, "download"):
        _download(source, root)
    found, missing = find_files(source, root)
    if missing:
        raise _missing_error(source, root, missing)
    stamp = tuple(
        (str(found[role].resolve()), found[role].stat().st_size, found[role].stat().st_mtime_ns)
        for role, _ in _ROLES
    )
    x_train, y_train, x_test, y_test = _parse(stamp)
    return build_dataset(
        source.name,
        x_train=x_train[:, None],
        y_train=y_train,
        x_test=x_test[:, None],
        y_test=y_test,
        class_names=source.class_names,
        identity={
            "source": f"{source.folder} IDX files (official split)",
            "source_url": source.mirror,
        },
    )


@register_dataset("mnist")
def mnist(root: str = "data", download: bool = False) -> Dataset:
    """The full MNIST digits: 60,000 train / 10,000 test, 1x28x28, from ``<root>/MNIST/raw``."""
    return load_idx_dataset(MNIST, root, download)


@register_dataset("fashion_mnist")
def fashion_mnist(root: str = "data", download: bool = False) -> Dataset:
    """Fashion-MNIST: 60,000 train / 10,000 test, 1x28x28, from ``<root>/FashionMNIST/raw``."""
    return load_idx_dataset(FASHION_MNIST, root, download)
