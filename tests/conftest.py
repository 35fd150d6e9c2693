"""Shared fixtures: every test gets its own MLflow store and weight cache (never the user's).

Models the tests attack are trained once per test session, whatever the number of pytest-xdist
workers: :func:`session_model` keeps them in a folder all workers of one session share, behind a file
lock, so the second worker loads what the first trained (``make test`` runs two workers).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

#: Under pytest-xdist each worker gets one core's worth of torch threads (two workers on 2 cores), and
#: so do the `robustcnn` processes its tests start (OMP_NUM_THREADS is inherited): a job at torch's
#: default of one thread per core beside the other worker oversubscribes the cores, and OpenMP's
#: spinning threads then slowed every subprocess test 2-3x (CI: the smoke CLI test 47 s -> 117 s).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(scope="session")
def session_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this test session shares (the parent of the workers' base temps)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "session-models"
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def session_model(
    folder: Path, name: str, build: Callable[[], torch.nn.Module], train: Callable[[torch.nn.Module], None]
) -> torch.nn.Module:
    """``build()`` with the weights trained by ``train`` once per session (any worker), then loaded."""
    weights = folder / f"{name}.safetensors"
    with _locked(folder / f"{name}.lock"):
        model = build()
        if weights.is_file():
            model.load_state_dict(load_file(str(weights)))
        else:
            train(model)
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    return model


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its schema created once (mlflow's migrations take seconds)."""
    from robustcnn.tracking.store import TrackingStore

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    with TrackingStore.at(f"sqlite:///{path}").start_run("warmup"):
        pass
    return path


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> dict[str, Path | str]:
    """A private tracking store, cache and working directory for one test."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("ROBUSTCNN_CACHE_DIR", str(cache))
    monkeypatch.setenv("ROBUSTCNN_STATE_DIR", str(tmp_path / "state"))  # deferred run closes
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    monkeypatch.chdir(tmp_path)
    return {"root": tmp_path, "store": store, "cache": cache}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the load (soak) tests, minutes each")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests skip cleanly without CUDA (CI has none); soak tests run only with --soak."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_soak = pytest.mark.skip(reason="load test: run with --soak (make soak)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "soak" in item.keywords and not config.getoption("--soak"):
            item.add_marker(no_soak)


@pytest.fixture(scope="session")
def mnist_small():
    """mnist5k (real digits, offline) — the whole 4,000/1,000 split."""
    from robustcnn.data import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def trained_lenet(mnist_small, session_models: Path):
    """An undefended lenet5 trained briefly on mnist5k (~97% clean): the standard attack target."""
    from robustcnn.models import build_model
    from robustcnn.training.loop import TrainConfig, fit

    info = mnist_small.info

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(
            "lenet5", input_shape=info.input_shape, num_classes=info.num_classes, mean=info.mean, std=info.std
        )

    def train(model: torch.nn.Module) -> None:
        config = TrainConfig(epochs=4, batch_size=64, shift=2)
        fit(model, mnist_small.x_train, mnist_small.y_train, config, torch.device("cpu"), progress=False)

    return session_model(session_models, "trained_lenet", build, train).eval()
