"""``cifar10_samples``: the 20 real CIFAR-10 test images that ship as PNGs inside foolbox.

A SMOKE-TEST SET ONLY: 20 images are far too few to train or to measure anything, and train and test
are the *same* 20 images (so train/test are not disjoint). It exists so that 3x32x32 models and
attacks can be exercised offline with real CIFAR-10 pixels. Files are ``foolbox/data/cifar10_II_L.png``
(II = index, L = label). They are located with ``importlib.util.find_spec`` without importing foolbox,
which is slow and pulls in eagerpy.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

import numpy as np

from robustcnn.data.base import Dataset, build_dataset
from robustcnn.data.cifar10 import CLASS_NAMES
from robustcnn.data.image_folder import read_image
from robustcnn.data.registry import register_dataset
from robustcnn.errors import DataError

EXPECTED = 20
_NAME = re.compile(r"^cifar10_(\d+)_(\d+)\.png$")


def foolbox_data_dir() -> Path:
    """foolbox's ``data`` folder, found without importing foolbox."""
    try:
        spec = importlib.util.find_spec("foolbox")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(
            "dataset 'cifar10_samples' needs the foolbox package, which ships the 20 sample "
            "images: pip install foolbox"
        )
    for folder in spec.submodule_search_locations or ():
        data = Path(folder) / "data"
        if data.is_dir():
            return data
    raise DataError(
        "the installed foolbox has no data/ folder with sample images; reinstall it: "
        "pip install --force-reinstall foolbox"
    )


def sample_files(folder: Path) -> list[tuple[Path, int]]:
    """[(png path, label)] sorted by the index in the file name; the label is the last number."""
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path, int(match.group(2))))
    found.sort()
    if len(found) != EXPECTED or any(label >= len(CLASS_NAMES) for _, _, label in found):
        raise DataError(
            f"expected {EXPECTED} files cifar10_<index>_<label 0-9>.png in {folder}, found "
            f"{len(found)}; reinstall foolbox: pip install --force-reinstall foolbox"
        )
    return [(path, label) for _, path, label in found]


def _foolbox_version() -> str:
    try:
        return importlib.metadata.version("foolbox")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@register_dataset("cifar10_samples")
def cifar10_samples() -> Dataset:
    """The 20 foolbox CIFAR-10 PNGs (3x32x32) as both train and test: a smoke-test set only."""
    files = sample_files(foolbox_data_dir())
    images = np.stack([read_image(path, channels=3, size=(32, 32)) for path, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return build_dataset(
        "cifar10_samples",
        x_train=images,
        y_train=labels,
        x_test=images.copy(),
        y_test=labels.copy(),
        class_names=CLASS_NAMES,
        identity={
            "source": f"foolbox {_foolbox_version()} data/cifar10_*.png",
            "note": "smoke-test set only: train and test are the same 20 images",
        },
    )
