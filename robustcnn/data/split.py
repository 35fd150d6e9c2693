"""Deterministic, seeded, stratified splits and subsets.

Why not ``numpy.random.Generator.permutation``: NumPy does not promise the same stream across
versions, and a split that silently changes after an upgrade would poison every cache key and
compared run. Here each sample gets a sort key from SplitMix64 (a fixed 64-bit integer mix of the
seed and the sample index), so a permutation depends on (seed, n) only, on every platform, forever.
"""

from __future__ import annotations

import numpy as np

from robustcnn.errors import ConfigError, DataError

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied elementwise to a uint64 array (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def check_seed(seed: object, key: str = "split_seed") -> int:
    """A seed must be a plain non-negative int (a bool or a float is a config mistake)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"data.{key} must be a non-negative integer, got {seed!r}")
    return int(seed)


def sort_keys(n: int, seed: int) -> np.ndarray:
    """One pseudo-random uint64 per index 0..n-1, fixed by ``seed``."""
    base = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    return _splitmix64(np.arange(n, dtype=np.uint64) + base)


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of 0..n-1 that depends only on (n, seed)."""
    return np.argsort(sort_keys(n, seed), kind="stable")


def stratified_split(
    labels: np.ndarray,
    *,
    seed: int,
    test_per_class: int | None = None,
    test_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), stratified by label, fixed by ``seed``.

    Give exactly one of ``test_per_class`` (the same count from every class) or ``test_fraction``
    (``round(fraction * n_class)`` per class, at least one test and one train image for classes with
    two or more; a class with a single image goes to train). Both index arrays come back in a seeded
    shuffled order, so any prefix of the test set is roughly class-balanced (a consumer that takes
    ``x_test[:100]`` does not get one digit only).
    """
    if (test_per_class is None) == (test_fraction is None):
        raise ValueError("give exactly one of test_per_class or test_fraction")
    labels = np.asarray(labels).reshape(-1)
    keys = sort_keys(len(labels), seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(keys[members], kind="stable")]
        if test_per_class is not None:
            if len(members) <= test_per_class:
                raise DataError(
                    f"class {label} has {len(members)} samples, need more than {test_per_class} "
                    "to hold that many out for testing"
                )
            n_test = test_per_class
        else:
            assert test_fraction is not None
            n_test = int(round(test_fraction * len(members)))
            n_test = 0 if len(members) < 2 else min(max(n_test, 1), len(members) - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = np.concatenate(train_parts) if train_parts else np.zeros(0, dtype=np.int64)
    test = np.concatenate(test_parts) if test_parts else np.zeros(0, dtype=np.int64)
    # Order each side by the same keys: a seeded shuffle that mixes the classes.
    train = train[np.argsort(keys[train], kind="stable")]
    test = test[np.argsort(keys[test], kind="stable")]
    return train.astype(np.int64), test.astype(np.int64)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation that deals the classes round-robin.

    Position i holds the ``i // n_classes``-th sample (in seeded order) of some class, so its first
    k entries are as class-balanced as the class sizes allow: the "first k of a fixed seeded
    permutation" that ``max_train`` / ``max_test`` take.
    """
    labels = np.asarray(labels).reshape(-1)
    keys = sort_keys(len(labels), seed)
    by_class = np.lexsort((keys, labels))  # grouped by label, seeded order inside each class
    sorted_labels = labels[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - group_start
    return np.lexsort((keys, rank)).astype(np.int64)


def subset_indices(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The first ``limit`` entries of :func:`stratified_order`, back in their original order.

    Keeping the original order makes a smaller subset a subsequence of a larger one.
    """
    return np.sort(stratified_order(labels, seed)[:limit])
