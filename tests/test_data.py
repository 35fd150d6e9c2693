"""Tests for robustcnn.data: the embedded datasets, the file parsers, the error paths and the registry.

Nothing here touches the network: the full datasets are exercised with tiny synthetic files written
to tmp_path, and downloads with a stubbed ``urlopen``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robustcnn.data.registry as registry
from robustcnn.data import (
    Dataset,
    DatasetInfo,
    available_datasets,
    build_dataset,
    load_dataset,
    register_dataset,
)
from robustcnn.data import cifar10 as cifar10_module
from robustcnn.data import download as dl
from robustcnn.data import samples as samples_module
from robustcnn.data.cifar10 import CLASS_NAMES as CIFAR_CLASSES
from robustcnn.data.cifar10 import RECORD_BYTES, read_cifar_bin
from robustcnn.data.idx import parse_idx, read_idx
from robustcnn.data.mnist import MNIST
from robustcnn.data.mnist5k import parse_uint_csv, split_indices
from robustcnn.data.split import seeded_permutation, stratified_order, stratified_split
from robustcnn.errors import ConfigError, DataError, RobustCNNError

BUILTIN = {"mnist5k", "mnist", "fashion_mnist", "cifar10", "image_folder", "cifar10_samples"}


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def _check_tensors(ds: Dataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.dim() == 4 and tuple(x.shape[1:]) == ds.info.input_shape
        assert x.is_contiguous() and len(x) == len(y)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < ds.info.num_classes
    identity = ds.info.identity
    assert json.loads(json.dumps(identity)) == identity
    assert all(isinstance(v, (str, int, float)) for v in identity.values())


# --------------------------------------------------------------------------- registry


def test_all_builtin_datasets_are_registered() -> None:
    assert BUILTIN <= set(available_datasets())
    assert available_datasets() == sorted(available_datasets())


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist6k")
    message = str(info.value)
    assert "mnist6k" in message and "did you mean 'mnist5k'" in message
    for name in BUILTIN:
        assert name in message
    assert isinstance(info.value, RobustCNNError)


def test_unknown_option_is_a_config_error_naming_key_and_accepted_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist5k", split_sed=1)
    message = str(info.value)
    assert "'split_sed'" in message and "split_seed" in message
    assert "max_train" in message and "max_test" in message


def test_missing_required_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="root"):
        load_dataset("image_folder")


@pytest.mark.parametrize("bad", [0, -3, "10", 2.5, True])
def test_bad_limit_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_train"):
        load_dataset("mnist5k", max_train=bad)


def test_custom_loader_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_dataset("toy")
    def toy(scale: int = 1) -> Dataset:
        x = np.full((6, 2, 3, 3), 51 * scale, dtype=np.uint8)
        y = np.arange(6) % 2
        return build_dataset(
            "toy",
            x_train=x,
            y_train=y,
            x_test=x[:2],
            y_test=y[:2],
            class_names=("a", "b"),
            identity={"scale": scale},
        )

    ds = load_dataset("toy", scale=2)
    assert "toy" in available_datasets()
    assert ds.info.mean == pytest.approx((0.4, 0.4)) and ds.info.std == pytest.approx((0.0, 0.0))
    assert ds.info.identity["scale"] == 2 and ds.info.identity["dataset"] == "toy"
    assert torch.allclose(ds.x_train, torch.full_like(ds.x_train, 0.4))
    hash(ds.info)  # usable as a dict key despite the identity dict
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy")(lambda: ds)


# --------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_dtypes_and_info(mnist5k: Dataset) -> None:
    _check_tensors(mnist5k)
    assert mnist5k.x_train.shape == (4000, 1, 28, 28)
    assert mnist5k.x_test.shape == (1000, 1, 28, 28)
    info = mnist5k.info
    assert isinstance(info, DatasetInfo)
    assert info.name == "mnist5k" and info.num_classes == 10 and info.input_shape == (1, 28, 28)
    assert info.class_names == tuple("0123456789")
    assert float(mnist5k.x_train.max()) == 1.0  # scaled by 255, not by the max
    # Computed on the train split, per channel; close to the well-known full-MNIST values.
    assert len(info.mean) == len(info.std) == 1
    assert info.mean[0] == pytest.approx(float(mnist5k.x_train.double().mean()), abs=1e-6)
    assert info.std[0] == pytest.approx(float(mnist5k.x_train.double().std(unbiased=False)), abs=1e-6)
    assert 0.12 < info.mean[0] < 0.14 and 0.29 < info.std[0] < 0.32


def test_mnist5k_split_is_stratified(mnist5k: Dataset) -> None:
    assert torch.bincount(mnist5k.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist5k.y_test, minlength=10).tolist() == [100] * 10
    # Order is a seeded shuffle: a prefix is mixed, not one digit only.
    assert len(set(mnist5k.y_test[:50].tolist())) >= 8


def test_mnist5k_train_and_test_are_disjoint() -> None:
    for seed in (0, 1):
        train, test = split_indices(seed)
        assert len(train) == 4000 and len(test) == 1000
        assert not set(train.tolist()) & set(test.tolist())
        assert sorted([*train.tolist(), *test.tolist()]) == list(range(5000))


def test_mnist5k_split_is_deterministic(mnist5k: Dataset) -> None:
    again = load_dataset("mnist5k", split_seed=0)
    assert again.info.identity == mnist5k.info.identity
    assert torch.equal(again.x_test, mnist5k.x_test) and torch.equal(again.y_train, mnist5k.y_train)
    other = load_dataset("mnist5k", split_seed=1)
    assert other.info.identity["split_seed"] == 1
    for key in ("split_test_indices_sha256", "test_sha256", "train_labels_sha256"):
        assert other.info.identity[key] != mnist5k.info.identity[key]
    assert not torch.equal(other.x_test, mnist5k.x_test)


def test_mnist5k_split_is_pinned(mnist5k: Dataset) -> None:
    """The split must never change silently: it is part of every cache key and compared run.

    If this fails after an intended change of the split algorithm, cached weights become stale.
    """
    identity = mnist5k.info.identity
    assert identity["split_test_indices_sha256"] == "7ec5a97046e8ccac"
    assert identity["source_sha256"] == "265dae2ca3a5fb0c"
    assert seeded_permutation(8, 0).tolist() == seeded_permutation(8, 0).tolist()


def test_mnist5k_returns_fresh_tensors(mnist5k: Dataset) -> None:
    reference = mnist5k.x_train[0].clone()
    first = load_dataset("mnist5k")
    first.x_train.zero_()
    first.y_test.fill_(3)
    second = load_dataset("mnist5k")
    assert torch.equal(second.x_train[0], reference)
    assert torch.equal(second.y_test, mnist5k.y_test)


def test_mnist5k_bad_split_seed() -> None:
    with pytest.raises(ConfigError, match="split_seed"):
        load_dataset("mnist5k", split_seed=-1)


def test_max_train_and_max_test(mnist5k: Dataset) -> None:
    small = load_dataset("mnist5k", max_train=100, max_test=55)
    _check_tensors(small)
    assert len(small.y_train) == 100 and len(small.y_test) == 55
    assert torch.bincount(small.y_train, minlength=10).tolist() == [10] * 10  # class-balanced prefix
    assert torch.bincount(small.y_test, minlength=10).min() >= 5
    identity = small.info.identity
    assert identity["train_max"] == 100 and identity["test_max"] == 55 and identity["train_n"] == 100
    assert "subset_seed" in identity and identity["test_sha256"] != mnist5k.info.identity["test_sha256"]
    # Normalisation constants stay those of the full train split.
    assert small.info.mean == mnist5k.info.mean and small.info.std == mnist5k.info.std
    # The subset is deterministic and drawn from the full split.
    again = load_dataset("mnist5k", max_train=100, max_test=55)
    assert torch.equal(again.x_train, small.x_train) and again.info.identity == identity
    full_rows = {row.numpy().tobytes() for row in mnist5k.x_test}
    assert all(row.numpy().tobytes() in full_rows for row in small.x_test)
    # A limit above the size is a no-op and does not change the identity.
    assert load_dataset("mnist5k", max_test=10_000).info.identity == mnist5k.info.identity


# --------------------------------------------------------------------------- splits and the CSV parser


def test_stratified_order_deals_classes_round_robin() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3)
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(18))
    assert sorted(labels[order[:9]].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not np.array_equal(order, stratified_order(labels, seed=4))


def test_stratified_split_by_fraction() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train, test = stratified_split(labels, seed=0, test_fraction=0.2)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]  # a lone image stays in train
    assert not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == 16


@pytest.mark.parametrize(
    "text",
    [
        b"0,12,255\n7,0,1\n",  # 1-3 digit numbers
        b"0,12,255\n7,0,1",  # no trailing newline
        b"0,12,255\r\n7,0,1\r\n",  # Windows line ends
        b"0.0,12,255\n7,0,1\n",  # floats: slow path
        b"1000,1,2\n3,4,5\n",  # 4 digits: slow path
        b"0,1,2\n\n3,4,5\n",  # blank line: slow path
        b"1,2\n3,4,5,6\n7,8\n",  # ragged rows: slow path (numpy rejects them)
    ],
)
def test_uint_csv_parser_agrees_with_numpy(text: bytes) -> None:
    try:
        expected = np.loadtxt(io.BytesIO(text), delimiter=",", ndmin=2)
    except ValueError:
        with pytest.raises(DataError, match="cannot parse"):
            parse_uint_csv(text)
        return
    parsed = parse_uint_csv(text)
    assert parsed.dtype == np.int64 and np.array_equal(parsed, expected)


# ----------------------------------------------------------------------- IDX files, mnist, fashion_mnist


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(dtype).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(array)
    path = tmp_path / ("a-idx3-ubyte.gz" if gz else "a-idx3-ubyte")
    path.write_bytes(gzip.compress(data) if gz else data)
    parsed = read_idx(path, expected_ndim=3)
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, array)


def test_idx_reader_big_endian_ints() -> None:
    array = np.array([1, -2, 70000], dtype=np.int32)
    parsed = parse_idx(_idx_bytes(array, 0x0C))
    assert parsed.dtype == np.int32 and parsed.tolist() == [1, -2, 70000]


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8))
    cases = {
        "bad-magic": b"\x12\x34" + good[2:],
        "bad-type": good[:2] + b"\x42" + good[3:],
        "truncated": good[:-1],
        "empty": b"",
        "bad.gz": b"\x1f\x8b not really gzip",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            read_idx(path)
    path = tmp_path / "good"
    path.write_bytes(good)
    with pytest.raises(DataError, match="expected 1-d"):
        read_idx(path, expected_ndim=1)


def _write_mnist(raw: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> None:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = _idx_bytes(rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        labels = _idx_bytes((np.arange(n) % 10).astype(np.uint8))
        (raw / (f"{prefix}-images-idx3-ubyte" + (".gz" if gz else ""))).write_bytes(
            gzip.compress(images) if gz else images
        )
        # Labels unzipped either way: both forms are accepted side by side.
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


def test_identity_pins_the_train_pixels_of_idx_files(tmp_path: Path) -> None:
    """IDX files replaced under the same names (``data.download=true`` after the files changed, a
    user's copy): the identity, and with it the weight cache and results keys, must change."""
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw, gz=False)
    before = load_dataset("mnist", root=str(tmp_path))
    images = raw / "train-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF  # one pixel of the last train image
    images.write_bytes(bytes(data))
    after = load_dataset("mnist", root=str(tmp_path))
    assert not torch.equal(after.x_train, before.x_train) and torch.equal(after.x_test, before.x_test)
    assert after.info.identity != before.info.identity


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_dataset_from_synthetic_files(tmp_path: Path, name: str, folder: str) -> None:
    _write_mnist(tmp_path / folder / "raw")
    ds = load_dataset(name, root=str(tmp_path))
    _check_tensors(ds)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.y_test.tolist() == [0, 1, 2, 3, 4]
    assert ds.info.num_classes == 10
    if name == "fashion_mnist":
        assert ds.info.class_names[0] == "T-shirt/top" and ds.info.class_names[-1] == "Ankle boot"


@pytest.mark.parametrize(
    ("name", "folder", "url"),
    [
        ("mnist", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        ("fashion_mnist", "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    ],
)
def test_missing_idx_files_error_names_them(tmp_path: Path, name: str, folder: str, url: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, root=str(tmp_path))
    message = str(info.value)
    raw = tmp_path / folder / "raw"
    for base in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert str(raw / f"{base}.gz") in message
    assert "data.download=true" in message and url in message
    assert "\n" not in message  # the CLI prints errors as one line


def test_mnist_corrupt_file_is_a_data_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw, gz=False)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=str(tmp_path))


def test_mnist_download_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", root=str(tmp_path), download=True)
    message = str(info.value)
    assert "offline" in message and MNIST.mirror + "train-images-idx3-ubyte.gz" in message
    assert not list((tmp_path / "MNIST" / "raw").glob("*.part"))


def test_download_verifies_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"the published bytes"
    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    dest = tmp_path / "sub" / "file.gz"
    with pytest.raises(DataError, match="md5"):
        dl.download_file("https://example.invalid/file.gz", dest, md5="0" * 32)
    assert not dest.exists() and not dest.with_name("file.gz.part").exists()
    good = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    assert dl.ensure_file("https://example.invalid/file.gz", dest, md5=good).read_bytes() == payload
    assert dl.ensure_file("ftp://example.invalid/ignored", dest, md5=good) == dest  # present: no download


def test_mnist_download_path_with_a_stubbed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole download=True path, offline: urlopen serves synthetic files whose md5 we pin."""
    served: dict[str, bytes] = {}
    for prefix, n in (("train", 4), ("t10k", 3)):
        images = _idx_bytes(np.full((n, 28, 28), 255, dtype=np.uint8))
        labels = _idx_bytes(np.arange(n, dtype=np.uint8))
        pairs = ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels))
        for base, content in pairs:
            url = MNIST.mirror + base + ".gz"
            served[url] = gzip.compress(content)
            monkeypatch.setitem(MNIST.md5, base, hashlib.md5(served[url]).hexdigest())
    requested: list[str] = []

    def fake_urlopen(request: urllib.request.Request, timeout: float) -> io.BytesIO:
        requested.append(request.full_url)
        return io.BytesIO(served[request.full_url])

    monkeypatch.setattr(dl.urllib.request, "urlopen", fake_urlopen)
    ds = load_dataset("mnist", root=str(tmp_path), download=True)
    assert ds.x_train.shape == (4, 1, 28, 28) and float(ds.x_train.min()) == 1.0
    assert sorted(requested) == sorted(served)
    requested.clear()
    load_dataset("mnist", root=str(tmp_path), download=True)  # verified files are not fetched again
    assert requested == []


def test_cifar10_download_path_with_a_stubbed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {f"cifar-10-batches-bin/data_batch_{i}.bin": _cifar_bytes([i])[0] for i in range(1, 6)}
    members["cifar-10-batches-bin/test_batch.bin"] = _cifar_bytes([0, 9])[0]
    archive = _tar(tmp_path / "served.tar.gz", members).read_bytes()
    monkeypatch.setattr(cifar10_module, "MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda request, timeout: io.BytesIO(archive))
    root = tmp_path / "root"
    ds = load_dataset("cifar10", root=str(root), download=True)
    assert ds.x_train.shape == (5, 3, 32, 32) and ds.y_test.tolist() == [0, 9]
    assert (root / "cifar-10-binary.tar.gz").is_file()


def test_download_option_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="download"):
        load_dataset("mnist", root=str(tmp_path), download="yes")


# --------------------------------------------------------------------------- CIFAR-10 binary


def _cifar_bytes(labels: list[int]) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(len(labels))
    images = rng.integers(0, 256, (len(labels), 3, 32, 32)).astype(np.uint8)
    records = [bytes([label]) + image.tobytes() for label, image in zip(labels, images, strict=True)]
    return b"".join(records), images


def test_cifar_binary_parser(tmp_path: Path) -> None:
    data, images = _cifar_bytes([3, 0, 9])
    path = tmp_path / "batch.bin"
    path.write_bytes(data)
    x, y = read_cifar_bin(path)
    assert y.tolist() == [3, 0, 9] and x.dtype == np.uint8 and x.shape == (3, 3, 32, 32)
    assert np.array_equal(x, images)
    assert x[1, 0, 0, 1] == data[RECORD_BYTES + 1 + 1]  # red plane first, row-major
    assert x[1, 2, 31, 31] == data[2 * RECORD_BYTES - 1]  # blue plane last


def test_cifar_binary_parser_rejects_bad_files(tmp_path: Path) -> None:
    data, _ = _cifar_bytes([1, 2])
    (tmp_path / "short.bin").write_bytes(data[:-1])
    with pytest.raises(DataError, match="short.bin"):
        read_cifar_bin(tmp_path / "short.bin")
    (tmp_path / "label.bin").write_bytes(bytes([42]) + data[1:])
    with pytest.raises(DataError, match="label 42"):
        read_cifar_bin(tmp_path / "label.bin")


def test_cifar10_from_synthetic_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(_cifar_bytes([i, i + 1])[0])
    (folder / "test_batch.bin").write_bytes(_cifar_bytes([7, 8, 9])[0])
    ds = load_dataset("cifar10", root=str(tmp_path))
    _check_tensors(ds)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.y_test.tolist() == [7, 8, 9]
    assert ds.info.class_names == CIFAR_CLASSES and len(ds.info.mean) == 3


def test_cifar10_missing_files_error(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-bin" / "test_batch.bin") in message
    assert "cifar-10-binary.tar.gz" in message and "data.download=true" in message
    assert "pickle" in message  # explains why the Python version found there is not used


# --------------------------------------------------------------------------- safe tar extraction


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return path


@pytest.mark.parametrize(
    ("members", "symlink"),
    [
        ({"ok/a.bin": b"1", "../evil.txt": b"x"}, None),
        ({"ok/a.bin": b"1", "ok/../../evil.txt": b"x"}, None),
        ({"/tmp/evil.txt": b"x"}, None),
        ({"ok/a.bin": b"1"}, "ok/link"),
    ],
)
def test_tar_extraction_refuses_unsafe_members(
    tmp_path: Path, members: dict[str, bytes], symlink: str | None
) -> None:
    archive = _tar(tmp_path / "a.tar.gz", members, symlink)
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="refusing"):
        dl.safe_extract_tar(archive, dest)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()


def test_tar_extraction_of_a_good_archive(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {"cifar-10-batches-bin/x.bin": b"abc"})
    dl.safe_extract_tar(archive, tmp_path / "out")
    assert (tmp_path / "out" / "cifar-10-batches-bin" / "x.bin").read_bytes() == b"abc"


# --------------------------------------------------------------------------- image_folder


def _image_tree(root: Path, per_class: int = 5) -> Path:
    modes = ["RGB", "L", "RGBA", "P"]
    for c, name in enumerate(("dog", "cat", "bird")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (10 + i, 7 + c)  # different sizes: everything is resized
            Image.new(modes[i % 4], size, color=40 * c + i).save(folder / f"{i}.png")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"ignored")
    return root


def test_image_folder_loads_and_splits(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "imgs")
    ds = load_dataset("image_folder", root=str(root), image_size=[8, 6])
    _check_tensors(ds)
    assert ds.info.class_names == ("bird", "cat", "dog")  # sorted folder names
    assert ds.info.input_shape == (3, 8, 6) and len(ds.info.mean) == 3
    assert torch.bincount(ds.y_test, minlength=3).tolist() == [1, 1, 1]  # 0.2 * 5 per class
    assert torch.bincount(ds.y_train, minlength=3).tolist() == [4, 4, 4]
    assert ds.info.identity["files"] == 15 and ds.info.identity["image_size"] == "8x6"
    grey = load_dataset("image_folder", root=str(root), image_size=(4, 4), channels=1, test_fraction=0.4)
    assert grey.x_train.shape[1:] == (1, 4, 4) and len(grey.y_test) == 6
    again = load_dataset("image_folder", root=str(root), image_size=[8, 6])
    assert again.info.identity == ds.info.identity and torch.equal(again.x_test, ds.x_test)
    other = load_dataset("image_folder", root=str(root), image_size=[8, 6], split_seed=5)
    assert other.info.identity != ds.info.identity


def test_identity_pins_the_train_pixels_of_an_image_folder(tmp_path: Path) -> None:
    """A train image edited in place, its name and byte size unchanged (an uncompressed BMP): the
    identity must change, so cached weights and results of the old images are not taken for new."""
    root = tmp_path / "imgs"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (6, 6), color=40 * c + 5 * i + 1).save(root / name / f"{i}.bmp")
    before = load_dataset("image_folder", root=str(root), image_size=[6, 6], channels=1)
    in_train = {round(float(x[0, 0, 0]) * 255) for x in before.x_train}
    edited = next(p for p in sorted(root.rglob("*.bmp")) if np.asarray(Image.open(p))[0, 0] in in_train)
    size = edited.stat().st_size
    Image.new("L", (6, 6), color=250).save(edited)
    assert edited.stat().st_size == size
    after = load_dataset("image_folder", root=str(root), image_size=[6, 6], channels=1)
    assert torch.equal(after.x_test, before.x_test)  # the test split is as it was
    assert after.info.identity != before.info.identity


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("image_folder", root=str(tmp_path / "nope"))
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(single / "only" / "a.png")
    with pytest.raises(DataError, match="at least 2"):
        load_dataset("image_folder", root=str(single))
    root = _image_tree(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset("image_folder", root=str(root))
    (root / "empty").rmdir()
    (root / "cat" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("image_folder", root=str(root))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("channels", 2),
        ("test_fraction", 1.5),
        ("test_fraction", 0),
        ("image_size", [0, 4]),
        ("image_size", 32),
        ("split_seed", "0"),
    ],
)
def test_image_folder_bad_options(tmp_path: Path, key: str, value: object) -> None:
    root = _image_tree(tmp_path / "imgs")
    with pytest.raises(ConfigError, match=key):
        load_dataset("image_folder", root=str(root), **{key: value})


# --------------------------------------------------------------------------- cifar10_samples


def test_cifar10_samples() -> None:
    had_foolbox = "foolbox" in sys.modules
    ds = load_dataset("cifar10_samples")
    _check_tensors(ds)
    assert ds.x_test.shape == (20, 3, 32, 32) and ds.info.class_names == CIFAR_CLASSES
    files = samples_module.sample_files(samples_module.foolbox_data_dir())
    assert ds.y_test.tolist() == [int(p.stem.rsplit("_", 1)[1]) for p, _ in files]
    assert ds.y_test[:4].tolist() == [3, 8, 8, 0]  # cifar10_00_3.png, cifar10_01_8.png, ...
    assert torch.equal(ds.x_train, ds.x_test) and "smoke-test" in ds.info.identity["note"]
    assert had_foolbox or "foolbox" not in sys.modules  # located, never imported


def test_cifar10_samples_without_foolbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install foolbox"):
        load_dataset("cifar10_samples")
