"""Nothing the tool reads runs code, and nothing it writes escapes the folders the user chose.

Every loader gets the same malicious pickle (unpickling it would create a marker file); YAML is
loaded safely; the package source holds no eval/exec/unsafe deserialisation outside the one
opt-in (audit.allow_pickle); names from configs and stores become safe single path components.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from robustcnn.errors import RobustCNNError
from robustcnn.files import safe_file_name
from robustcnn.hashing import file_sha256

PACKAGE = Path(__file__).resolve().parent.parent / "robustcnn"


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any command an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path: Path, marker: Path, zipped: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if zipped:
        torch.save({"state_dict": Payload(marker)}, path)  # what a poisoned torch.save looks like
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    return path


def _weight_cache(tmp: Path, marker: Path) -> None:
    """A cache entry whose weights are a pickle with a matching checksum: discarded, never loaded."""
    from robustcnn.training.cache import WeightCache

    cache = WeightCache(tmp / "cache")
    cache.ensure_writable()
    weights = _evil_file(cache.weights_path("k"), marker, zipped=True)
    cache.meta_path("k").write_text(json.dumps({"sha256": file_sha256(weights)}))
    assert cache.load("k", torch.nn.Linear(2, 2)) is None
    assert not weights.exists()  # a damaged entry is removed, so it is never tried again


def _audit_file(tmp: Path, marker: Path) -> None:
    from robustcnn.deployed.loading import load_model_file

    for name, zipped in (("raw.pkl", False), ("model.pt", True)):
        with pytest.raises(RobustCNNError, match="allow_pickle"):
            load_model_file(_evil_file(tmp / name, marker, zipped))


def _idx_dataset(tmp: Path, marker: Path) -> None:
    from robustcnn.data.idx import read_idx

    with pytest.raises(RobustCNNError):
        read_idx(_evil_file(tmp / "train-images-idx3-ubyte", marker))


def _cifar_binary(tmp: Path, marker: Path) -> None:
    from robustcnn.data.cifar10 import read_cifar_bin

    with pytest.raises(RobustCNNError):
        read_cifar_bin(_evil_file(tmp / "data_batch_1.bin", marker))


def _image_folder(tmp: Path, marker: Path) -> None:
    from robustcnn.data.image_folder import read_image

    with pytest.raises(RobustCNNError):
        read_image(_evil_file(tmp / "cats" / "0.png", marker), channels=3, size=(8, 8))


def _sync_folder(tmp: Path, marker: Path) -> None:
    from robustcnn.tracking.sync import sync_folder

    folder = tmp / "job"
    _evil_file(folder / "results.json", marker)
    _evil_file(folder / "run.json", marker)
    assert sync_folder(folder).status == "damaged"


LOADERS: dict[str, Callable[[Path, Path], None]] = {
    "weight cache": _weight_cache,
    "audit model file": _audit_file,
    "idx dataset": _idx_dataset,
    "cifar10 binary": _cifar_binary,
    "image_folder": _image_folder,
    "sync results": _sync_folder,
}


@pytest.mark.parametrize("loader", LOADERS, ids=list(LOADERS))
def test_no_loader_runs_a_malicious_pickle(loader: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    LOADERS[loader](tmp_path, marker)
    assert not marker.exists(), f"the {loader} loader ran the pickle's code"


def test_yaml_configs_are_loaded_safely(tmp_path: Path) -> None:
    """A python-object tag in a user's config is an error, through OmegaConf and the CLI."""
    from omegaconf import OmegaConf

    marker = tmp_path / "pwned"
    evil = f'# @package _global_\nseed: !!python/object/apply:os.system ["touch {marker}"]\n'
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "evil.yaml").write_text(evil)
    with pytest.raises(Exception, match="python/object"):
        OmegaConf.load(tmp_path / "experiment" / "evil.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "run", "--config-dir", str(tmp_path), "experiment=evil"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert not marker.exists()


#: Calls that execute code or deserialise objects; each allowed place is named with its reason.
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load")}
ALLOWED = {
    # the documented opt-in: audit.allow_pickle=true unpickles a full model the user trusts
    ("deployed/loading.py", "weights_only=False"),
}


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_never_evaluates_or_unpickles() -> None:
    problems = []
    for path in _source_files():
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                problems.append(f"{relative}:{node.lineno} calls {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in FORBIDDEN_ATTRIBUTES:
                    problems.append(f"{relative}:{node.lineno} calls {func.value.id}.{func.attr}()")
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and isinstance(keyword.value, ast.Constant):
                    if keyword.value.value is True:
                        problems.append(f"{relative}:{node.lineno} passes allow_pickle=True")
                if keyword.arg == "weights_only" and isinstance(keyword.value, ast.Constant):
                    if keyword.value.value is False and (relative, "weights_only=False") not in ALLOWED:
                        problems.append(f"{relative}:{node.lineno} passes weights_only=False")
    assert not problems, "\n".join(problems)


def test_every_torch_load_is_weights_only_or_the_documented_opt_in() -> None:
    """``torch.load`` without ``weights_only=True`` unpickles whatever the file holds."""
    problems = []
    for path in _source_files():
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if flags.get("weights_only") is not True and (relative, "weights_only=False") not in ALLOWED:
                    problems.append(f"{relative}:{node.lineno}")
    assert not problems, f"torch.load without weights_only=True: {problems}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "etc_passwd"),
        ("..", "unnamed"),
        ("/abs/path", "abs_path"),
        ("a b\nc", "a_b_c"),
        ("ok-name_1.0", "ok-name_1.0"),
        ("\x00\x1b[31m", "31m"),
    ],
)
def test_names_from_configs_become_one_safe_path_component(name: str, expected: str) -> None:
    safe = safe_file_name(name)
    assert safe == expected
    assert "/" not in safe and safe not in (".", "..") and (Path("/out") / safe).parent == Path("/out")


def test_an_experiment_named_like_a_path_stays_inside_reports(tmp_path: Path) -> None:
    from robustcnn.report.build import folder_name

    for name in ("../../outside", "/etc", "a/../../b"):
        folder = (tmp_path / "reports" / folder_name(name, "7")).resolve()
        assert folder.parent == (tmp_path / "reports").resolve()


def test_audit_folder_names_stay_inside_reports() -> None:
    from robustcnn.deployed.sources import model_name

    for source in ("../../x.onnx", "models:/../../evil/1", "runs:/abc/../../../m.pt"):
        assert "/" not in model_name(source) and ".." not in model_name(source).split("_")
