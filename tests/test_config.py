"""Every config composes, every experiment preset runs in a tiny mode, and the wheel ships conf/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from face_assets import require_face_assets

from robustcnn.config import compose, conf_dir, config_groups
from robustcnn.jobs.dispatch import run_job
from robustcnn.jobs.inputs import to_container
from robustcnn.tracking.store import TrackingStore

#: Overrides that shrink any job to seconds: a sliver of data, a couple of batches, one epoch.
TINY = [
    "data.max_train=128",
    "data.max_test=64",
    "training.epochs=1",
    "training.max_batches=2",
    "training.batch_size=32",
]
#: The same for a face patch study: one attacker, two targets, a few steps and held-out draws.
FACE_TINY = ["face.attackers=1", "face.targets=2", "face.steps=2", "face.eot_samples=2", "face.eval_draws=4"]
#: Datasets that need files the machine does not have (their loaders are unit-tested on fixtures).
NEEDS_FILES = {"mnist", "fashion_mnist", "cifar10", "image_folder"}


def test_conf_dir_is_the_checkout_conf() -> None:
    assert (conf_dir() / "config.yaml").is_file()
    groups = config_groups()
    for group in ("data", "model", "training", "defense", "paths", "experiment"):
        assert groups.get(group), f"config group {group} is empty"


@pytest.mark.parametrize(
    "override",
    [
        f"{group}={choice}"
        for group, choices in config_groups().items()
        if group not in ("hydra",)
        for choice in choices
    ],
)
def test_every_config_composes(override: str) -> None:
    extra = ["data.root=/nonexistent"] if override in ("data=image_folder", "data=face_folder") else []
    cfg = compose([override, *extra])
    resolved = to_container(cfg)
    for section in ("data", "model", "training", "defense", "paths", "tracking", "eval"):
        assert section in resolved
    assert resolved["data"]["name"] and resolved["model"]["name"] and resolved["defense"]["name"]


def experiment_cells() -> list[tuple[str, ...]]:
    """Every preset, and for a preset that is a sweep (hydra.sweeper.params) every cell of its grid."""
    from itertools import product

    from omegaconf import OmegaConf

    cells: list[tuple[str, ...]] = []
    for experiment in config_groups()["experiment"]:
        preset = OmegaConf.load(conf_dir() / "experiment" / f"{experiment}.yaml")
        params = OmegaConf.select(preset, "hydra.sweeper.params") or {}
        grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
        cells += [(f"experiment={experiment}", *cell) for cell in product(*grid)]
    return cells


@pytest.mark.slow
@pytest.mark.parametrize("cell", experiment_cells(), ids=lambda cell: " ".join(cell))
def test_every_experiment_runs_tiny(cell: tuple[str, ...], isolated: dict) -> None:
    face = compose(list(cell)).task == "face_patch"
    cfg = compose([*cell, *(FACE_TINY if face else TINY)])
    if cfg.data.name in NEEDS_FILES:
        pytest.skip(f"{cell[0]} needs dataset files that are not on this machine")
    if face:
        require_face_assets()
    results = run_job(cfg, output_dir=isolated["root"] / "out", progress=False)
    if face:
        assert 0.0 <= results["dodging_success_rate"] <= 1.0
    else:
        assert 0.0 <= results["clean_accuracy"] <= 1.0
    assert (isolated["root"] / "out" / "results.json").is_file()
    run = TrackingStore.at(isolated["store"]).read_run(results["mlflow_run_id"])
    assert run["status"] == "FINISHED"
    if "model.pooling=avg" in cell:  # the sweep's two poolings of a defense must not share a name
        assert "pooling=avg" in run["tags"]["mlflow.runName"]
        assert results["model_label"] == "lenet5 pooling=avg"


def test_missing_mandatory_value_is_a_config_error() -> None:
    from robustcnn.errors import ConfigError

    with pytest.raises(ConfigError, match="data.root"):
        to_container(compose(["data=image_folder"]))


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("robustcnn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("robustcnn/conf/") and n.endswith(".yaml")}
    expected = {f"robustcnn/conf/{p.relative_to(conf_dir()).as_posix()}" for p in conf_dir().rglob("*.yaml")}
    assert expected <= shipped, f"configs missing from the wheel: {sorted(expected - shipped)}"
    for package in (
        "robustcnn/cli/__init__.py",
        "robustcnn/jobs/dispatch.py",
        "robustcnn/data/__init__.py",
        "robustcnn/models/__init__.py",
        "robustcnn/face/face_gallery.json",  # package data: the gallery's reviewed boxes
    ):
        assert package in names
    # the installed layout (no checkout next to it) finds its configs and composes a job
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "run", "--cfg", "job", "model=madry_cnn"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        check=True,
    )
    assert "name: madry_cnn" in out.stdout
    where = subprocess.run(
        [sys.executable, "-c", "from robustcnn.config import conf_dir; print(conf_dir())"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == site / "robustcnn" / "conf"


def test_pyproject_lists_every_package() -> None:
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "robustcnn").rglob("__init__.py")}
    assert on_disk | {"robustcnn.conf"} == listed, "update [tool.setuptools] packages in pyproject.toml"
