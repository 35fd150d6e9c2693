"""The two value types every consumer sees, and the one place that builds them from raw pixels.

Every built-in source stores pixels as uint8, so :func:`build_dataset` takes uint8 arrays: the
per-channel mean/std are then computed exactly (from 256-bin histograms, no float round-off and no
float copy of the whole train split), and the conversion to float32 in [0, 1] happens in one place.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from robustcnn.errors import DataError

#: Hex digits kept from a sha256: 64 bits is plenty to tell data sets apart and stays readable in MLflow.
SHORT_HASH = 16
#: The identity key holding the whole train split's content hash (pixels and labels).
TRAIN_CONTENT = "train_sha256"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a tracker need to know about a dataset, without the pixels.

    ``identity`` holds everything that fixes the data (source, split, subset, content hashes) as flat
    JSON scalars, so it can be logged as MLflow params and hashed into cache keys as is. It is left out
    of ``hash()`` (a dict is unhashable) but takes part in ``==``.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    identity: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3:
            raise DataError(f"dataset {self.name!r}: input_shape must be (C, H, W), got {self.input_shape}")
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"dataset {self.name!r}: mean/std need one value per channel ({channels})")
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"dataset {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        for key, value in self.identity.items():
            if not isinstance(key, str) or not isinstance(value, (str, int, float)):
                raise DataError(
                    f"dataset {self.name!r}: identity[{key!r}] = {value!r} is not a flat "
                    "str/int/float value; identities must be loggable as MLflow params"
                )


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: float32 images in [0, 1] (N, C, H, W) and int64 labels, train and test.

    ``eq=False`` because comparing tensors field by field has no single truth value; compare
    ``info.identity`` to ask whether two loads hold the same data.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        name = self.info.name
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32 or x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.info.input_shape):
                raise DataError(
                    f"dataset {name!r}: x_{split} must be float32 [N, *{self.info.input_shape}], "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise DataError(
                    f"dataset {name!r}: y_{split} must be int64 [{len(x)}], got {y.dtype} {tuple(y.shape)}"
                )
            if not x.is_contiguous():
                raise DataError(f"dataset {name!r}: x_{split} must be contiguous")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.info.num_classes):
                raise DataError(
                    f"dataset {name!r}: y_{split} has labels outside 0..{self.info.num_classes - 1}"
                )


def short_sha256(*parts: bytes | np.ndarray | torch.Tensor) -> str:
    """A short sha256 over byte strings and arrays (their raw little-endian bytes), without copies."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            digest.update(str(part.dtype.str).encode())
            digest.update(part.data)
        else:
            digest.update(part)
    return digest.hexdigest()[:SHORT_HASH]


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images [N, C, H, W], in [0, 1] units.

    Counts each channel's 256 grey levels (``torch.bincount`` is several times faster than numpy's
    here), so no float copy of the train split is needed and the result does not depend on float
    summation order.
    """
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"channel_stats needs uint8 [N, C, H, W] images, got {x.dtype} {x.shape}")
    if x.shape[0] == 0:
        raise DataError("cannot compute mean/std of an empty train split")
    levels = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(x.shape[1]):
        channel = _as_tensor(np.ascontiguousarray(x[:, c]).reshape(-1))
        counts = torch.bincount(channel, minlength=256).numpy().astype(np.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` for arrays that may be read-only (cached); callers must not write to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def to_float_images(x: np.ndarray) -> torch.Tensor:
    """uint8 [N, C, H, W] -> a new float32 tensor in [0, 1] (never shares memory with ``x``)."""
    # .to() copies, so a read-only cached array is never written to. Division (not multiplication by
    # 1/255) gives the correctly rounded k/255, the same on every platform.
    return _as_tensor(np.ascontiguousarray(x)).to(torch.float32).div_(255.0).contiguous()


def to_labels(y: np.ndarray) -> torch.Tensor:
    """Any integer label array -> a new int64 tensor."""
    return torch.from_numpy(np.array(y, dtype=np.int64, copy=True).reshape(-1))


def build_dataset(
    name: str,
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str],
    identity: dict[str, Any],
) -> Dataset:
    """Turn uint8 [N, C, H, W] images and integer labels into a :class:`Dataset`.

    mean/std come from the *whole* train split given here. :func:`~robustcnn.data.load_dataset`
    subsets afterwards (``max_train``), so a model trained on all the data and evaluated on a
    subset sees the same normalisation constants.

    ``identity["train_sha256"]`` hashes the whole train split's pixels and labels as given here:
    a loader's own identity fields name the source (a folder, a mirror) but not what is in it, and
    trained weights and results depend on every train pixel. Hashing the uint8 pixels is cheap
    (~0.1 s for CIFAR-10's 150 MB), four times less than their float copy.
    """
    for split, x in (("train", x_train), ("test", x_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(
                f"dataset {name!r}: {split} images must be uint8 [N, C, H, W], got {x.dtype} {x.shape}"
            )
    mean, std = channel_stats(x_train)
    identity = {**identity, TRAIN_CONTENT: short_sha256(x_train, np.asarray(y_train, dtype=np.int64))}
    info = DatasetInfo(
        name=name,
        num_classes=len(class_names),
        input_shape=(int(x_train.shape[1]), int(x_train.shape[2]), int(x_train.shape[3])),
        mean=mean,
        std=std,
        class_names=tuple(str(c) for c in class_names),
        identity=dict(identity),
    )
    return Dataset(
        x_train=to_float_images(x_train),
        y_train=to_labels(y_train),
        x_test=to_float_images(x_test),
        y_test=to_labels(y_test),
        info=info,
    )
