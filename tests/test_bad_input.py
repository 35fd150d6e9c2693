"""Bad input, tried systematically: `robustcnn run` with wrong overrides, and the validation layer.

The contract (robustcnn.errors, robustcnn.cli): a problem the user can fix exits with code 2 and
prints ONE line ``robustcnn: error: <problem and fix>`` on stderr, never a traceback, and nothing
already written (earlier results, the weight cache, the MLflow store's runs) is lost or overwritten.

Three layers, fastest first:

* ``RUN_CASES``: ``robustcnn run`` command lines, run in-process through ``robustcnn.cli.main`` (the
  same Hydra entry point as the console script, ~0.5 s a case instead of ~4 s for a subprocess),
  all in one workspace that holds what earlier runs would have left (``workspace``). Each case
  checks the exit code, the single error line, the key it names, that it started no MLflow run
  and that no earlier file changed; ``test_nothing_written_before_is_lost`` checks the whole tree
  once more after every case.
* ``COMPOSE_CASES``: overrides Hydra itself refuses while composing (unknown group choice, override
  syntax). Hydra prints its own message (several lines: the choices it knows, the grammar link)
  and exits 1, which the CLI maps to 2. Decision: accepted as long as there is no traceback, the
  exit code is 2 and the message names the bad value; rewording Hydra's messages would mean
  re-implementing its error reporting in cli.py.
* ``test_numeric_settings_are_validated_or_refused_with_the_key`` (hypothesis): random numbers
  (NaN, inf, negatives, huge, ints, floats, bools, strings, lists, null) for every numeric setting,
  straight into the validating functions; each value is accepted exactly when it lies in the
  documented range, else refused with a one-line RobustCNNError naming the key. Never another
  exception type.

Decided, and tested as accepted: ``attack=[]`` (documented: evaluate clean accuracy only),
``data.max_test`` above the split's size (means "all"), image files of another size or mode than
``data.image_size`` / ``data.channels`` (resized and converted, as documented). Decided and refused:
more than ``threat.MAX_EPS`` = 100 radii (each radius runs every attack once); ``threads`` above
1024. A 10,000-value ``threat.eps`` is refused too, but only tested through ``ThreatModel``: Hydra
itself needs ~27 s just to parse such an override, so the CLI row uses 1,000 values.

Not repeated here: model files (truncated, empty, not a model, wrong architecture, malicious
pickles) are tests/test_audit.py's BAD_INPUTS and pickle tests; images with NaN, of the wrong dtype
or shape given to the attack API are tests/test_attacks.py::test_bad_inputs_are_refused_before_work
(every dataset loader yields uint8 pixels, so a NaN image cannot reach `robustcnn run`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustcnn.errors import RobustCNNError

# Our launcher presets share the plugins' schema names on purpose (robustcnn.sweeps.launchers); the CLI
# silences Hydra's warning at import, but pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")

#: Appended to rows whose check needs the data (the model is built after loading it), so a row
#: costs seconds, never a real training run. Those rows are marked slow.
TINY = (
    "data.max_train=64",
    "data.max_test=32",
    "training.epochs=1",
    "training.max_batches=1",
    "training.batch_size=32",
)
HUGE_EPS = "threat.eps=[" + ",".join(f"{i / 1000:.4f}" for i in range(1000)) + "]"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# (id, overrides, what the one error line must contain: normally the config key)
RUN_CASES = [
    # -- unknown names at robustcnn's level (Hydra's are COMPOSE_CASES) -----------------------------
    pytest.param(["+threat.foo=1"], "foo", id="unknown-threat-key"),
    pytest.param(["+training.epoch=3"], "epoch", id="unknown-training-key"),
    pytest.param(["+defense.strength=1"], "strength", id="unknown-defense-key"),
    pytest.param(["+attack.pgd.stepz=3"], "stepz", id="unknown-attack-key"),
    pytest.param(["attack=[pgd]", "attack.pgd.backend=foolbox"], "attack.pgd.backend", id="unknown-backend"),
    pytest.param(["attack=[eot]", "attack.eot.attack=square"], "attack.eot.attack", id="eot-wraps-square"),
    pytest.param(
        ["attack=[transfer]", "attack.transfer.surrogate=alexnet"],
        "attack.transfer.surrogate",
        id="unknown-surrogate",
    ),
    pytest.param(["training.optimizer.name=rmsprop"], "training.optimizer.name", id="unknown-optimizer"),
    pytest.param(["threat.norm=l3"], "threat.norm", id="unknown-norm"),
    pytest.param(["threat.knowledge=grey_box"], "threat.knowledge", id="unknown-knowledge"),
    pytest.param(["attack=[pgd]", "attack.pgd.loss=hinge"], "attack.pgd.loss", id="unknown-loss"),
    pytest.param(["defense=dropout", "defense.mode=sometimes"], "defense.mode", id="unknown-dropout-mode"),
    pytest.param(["defense=prune", "defense.base=armour"], "defense.base", id="unknown-defense-base"),
    pytest.param(["device=nonsense"], "device", id="unknown-device"),
    pytest.param(["device=meta"], "device=meta", id="unsupported-device"),
    pytest.param(["device=cuda"], "CUDA is not available", id="cuda-without-cuda", marks=NO_CUDA),
    pytest.param(["threat.knowledge=black_box"], "threat.knowledge", id="black-box-with-gradient-attacks"),
    pytest.param(["data.name=mnist6k"], "mnist5k", id="unknown-dataset-name"),
    pytest.param(
        ["model.name=alexnet", *TINY],
        "model.name",
        id="unknown-model-name",
        marks=pytest.mark.slow,
    ),
    # -- wrong types ----------------------------------------------------------------------------------
    pytest.param(["training.epochs=abc"], "training.epochs", id="epochs-string"),
    pytest.param(["training.epochs=1.5"], "training.epochs", id="epochs-fraction"),
    pytest.param(["training.batch_size=[1,2]"], "training.batch_size", id="batch-size-list"),
    pytest.param(["training.optimizer.lr=fast"], "training.optimizer.lr", id="lr-string"),
    pytest.param(["training.optimizer=sgd"], "training.optimizer", id="section-replaced-by-a-string"),
    pytest.param(["training.use_cache=maybe"], "training.use_cache", id="bool-string"),
    pytest.param(["threat.eps=abc"], "threat.eps", id="eps-string"),
    pytest.param(["threat.eps=[0,abc]"], "threat.eps", id="eps-list-with-string"),
    pytest.param(["threat.eps=[[0.1]]"], "threat.eps", id="eps-nested-list"),
    pytest.param(["threat.targeted=maybe"], "threat.targeted", id="targeted-string"),
    pytest.param(["threat.target_class=abc"], "threat.target_class", id="target-class-string"),
    pytest.param(["defense=dropout", "defense.n_samples=abc"], "defense.n_samples", id="n-samples-string"),
    pytest.param(["attack=[pgd]", "attack.pgd.steps=abc"], "attack.pgd.steps", id="steps-string"),
    pytest.param(
        ["attack=[pgd]", "attack.pgd.random_start=maybe"], "attack.pgd.random_start", id="random-start-string"
    ),
    pytest.param(["attack=[eot]", "attack.eot.steps=abc"], "attack.eot.steps", id="eot-steps-string"),
    pytest.param(["threads=abc"], "threads", id="threads-string"),
    pytest.param(["data.max_test=abc"], "data.max_test", id="max-test-string"),
    pytest.param(["seed=abc"], "seed", id="seed-string"),
    pytest.param(
        ["eval.attack_batch_size=abc"],
        "eval.attack_batch_size",
        id="attack-batch-string",
    ),
    # -- out of range ---------------------------------------------------------------------------------
    pytest.param(["threat.eps=[-0.1]"], "threat.eps", id="eps-negative"),
    pytest.param(["threat.eps=[0,1.5]"], "threat.eps", id="eps-above-1-linf"),
    pytest.param(["threat.eps=[nan]"], "threat.eps", id="eps-nan"),
    pytest.param(["threat.eps=[0,inf]"], "threat.eps", id="eps-inf"),
    pytest.param(["threat.eps=[]"], "threat.eps", id="eps-empty"),
    pytest.param(["threat.eps=[0.3,0.1]"], "threat.eps", id="eps-unsorted"),
    pytest.param([HUGE_EPS, "threat.reference_eps=null"], "threat.eps", id="eps-1000-values"),
    pytest.param(["threat.reference_eps=0.7"], "threat.reference_eps", id="reference-eps-not-listed"),
    pytest.param(["threat.target_class=-1"], "threat.target_class", id="target-class-negative"),
    pytest.param(
        ["threat=mnist_l2", "threat.eps=[0,100]", "threat.reference_eps=100"],
        "L2 diameter",
        id="l2-eps-beyond-the-cube",
    ),
    pytest.param(["defense=prune", "defense.sparsity=-0.1"], "defense.sparsity", id="sparsity-negative"),
    pytest.param(["defense=prune", "defense.sparsity=1.0"], "defense.sparsity", id="sparsity-1"),
    pytest.param(["defense=prune", "defense.sparsity=nan"], "defense.sparsity", id="sparsity-nan"),
    pytest.param(["defense=dropout", "defense.rate=1.0"], "defense.rate", id="dropout-rate-1"),
    pytest.param(["defense=dropout", "defense.rate=-0.5"], "defense.rate", id="dropout-rate-negative"),
    pytest.param(["defense=pgd_at", "defense.eps=1.5"], "defense.eps", id="training-eps-above-1"),
    pytest.param(
        ["defense=prune", "defense.finetune_eps=inf"], "defense.finetune_eps", id="finetune-eps-inf"
    ),
    pytest.param(["training.optimizer.lr=0"], "training.optimizer.lr", id="lr-zero"),
    pytest.param(["training.optimizer.lr=-1"], "training.optimizer.lr", id="lr-negative"),
    pytest.param(["training.optimizer.lr=nan"], "training.optimizer.lr", id="lr-nan"),
    pytest.param(["training.epochs=-1"], "training.epochs", id="epochs-negative"),
    pytest.param(["training.batch_size=0"], "training.batch_size", id="batch-size-zero"),
    pytest.param(["training.batch_size=-8"], "training.batch_size", id="batch-size-negative"),
    pytest.param(["training.optimizer.momentum=1.5"], "training.optimizer.momentum", id="momentum-above-1"),
    pytest.param(["attack=[pgd]", "attack.pgd.steps=0"], "attack.pgd.steps", id="steps-zero"),
    pytest.param(["attack=[pgd]", "attack.pgd.restarts=0"], "attack.pgd.restarts", id="restarts-zero"),
    pytest.param(
        ["attack=[pgd]", "attack.pgd.step_size=-0.01"], "attack.pgd.step_size", id="step-size-negative"
    ),
    pytest.param(["attack=[square]", "attack.square.queries=0"], "attack.square.queries", id="queries-zero"),
    pytest.param(["attack=[eot]", "attack.eot.samples=0"], "attack.eot.samples", id="eot-samples-zero"),
    pytest.param(["eval.attack_batch_size=0"], "eval.attack_batch_size", id="attack-batch-zero"),
    pytest.param(["threads=0"], "threads", id="threads-zero"),
    pytest.param(["threads=-1"], "threads", id="threads-negative"),
    pytest.param(["threads=100000"], "threads", id="threads-huge"),
    pytest.param(["data.max_test=0"], "data.max_test", id="max-test-zero"),
    pytest.param(["data.max_train=-5"], "data.max_train", id="max-train-negative"),
    pytest.param(["data.split_seed=-1"], "data.split_seed", id="split-seed-negative"),
    pytest.param(
        ["eval.max_samples=-5", *TINY, "attack=[]"],
        "eval.max_samples",
        id="max-samples-negative",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        ["model.dropout=1.5", *TINY],
        "model.dropout",
        id="model-dropout-1.5",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        ["checks.tolerance=abc", *TINY, "attack=[fgsm]", "threat.eps=[0,0.1]", "threat.reference_eps=0.1"],
        "checks.tolerance",
        id="checks-tolerance-string",
        marks=pytest.mark.slow,
    ),
    # -- image folders ----------------------------------------------------------------------------------
    pytest.param(["data=image_folder"], "data.root", id="image-folder-without-root"),
    pytest.param(["data=image_folder", "data.root={root}/nowhere"], "data.root", id="image-folder-missing"),
    pytest.param(
        ["data=image_folder", "data.root={root}/a_file.txt"], "data.root", id="image-folder-is-a-file"
    ),
    pytest.param(
        ["data=image_folder", "data.root={root}/images/corrupt"], "broken.png", id="random-bytes-png"
    ),
    pytest.param(["data=image_folder", "data.root={root}/images/zero_byte"], "empty.png", id="zero-byte-png"),
    pytest.param(["data=image_folder", "data.root={root}/images/truncated"], "cut.png", id="truncated-png"),
    pytest.param(["data=image_folder", "data.root={root}/images/one_class"], "at least 2", id="one-class"),
    pytest.param(
        ["data=image_folder", "data.root={root}/images/empty_class"], "holds no images", id="empty-class"
    ),
    pytest.param(
        ["data=image_folder", "data.root={root}/images/singletons"], "2 or more", id="one-image-per-class"
    ),
    pytest.param(
        ["data=image_folder", "data.root={root}/images/ok", "data.channels=2"],
        "data.channels",
        id="channels-2",
    ),
    pytest.param(
        ["data=image_folder", "data.root={root}/images/ok", "data.image_size=32"],
        "data.image_size",
        id="image-size-scalar",
    ),
    pytest.param(
        ["data=image_folder", "data.root={root}/images/ok", "data.test_fraction=1.5"],
        "data.test_fraction",
        id="test-fraction-above-1",
    ),
    # -- what Hydra lets through but robustcnn cannot handle today -------------------------------------
    pytest.param(["training=[1]"], "training", id="group-given-a-list"),
    pytest.param(
        ["-m", "seed=0,1", "training.batch_size=0"],
        "training.batch_size",
        id="sweep-with-a-bad-value",
        marks=pytest.mark.slow,
    ),
]

# (id, overrides, what Hydra's message must contain)
COMPOSE_CASES = [
    pytest.param(["model=nope"], ["model/nope", "lenet5", "madry_cnn"], id="unknown-model"),
    pytest.param(["data=nope"], ["data/nope", "mnist5k"], id="unknown-data"),
    pytest.param(["attack=[nope]"], ["attack/nope"], id="unknown-attack-in-list"),
    pytest.param(["attack=nope"], ["attack/nope", "pgd"], id="unknown-attack"),
    pytest.param(["defense=nope"], ["defense/nope", "pgd_at"], id="unknown-defense"),
    pytest.param(["threat=nope"], ["threat/nope", "mnist_linf"], id="unknown-threat"),
    pytest.param(["experiment=nope"], ["experiment/nope", "smoke"], id="unknown-experiment"),
    pytest.param(["model="], ["model/"], id="empty-choice"),
    pytest.param(["=x"], ["Could not override"], id="empty-key"),
    pytest.param(["attack=[fgsm"], ["[fgsm"], id="unclosed-list"),
    pytest.param(["training.epochs"], ["training.epochs"], id="no-equals-sign"),
    pytest.param(["training.nokey=1"], ["training.nokey", "+training.nokey="], id="key-not-in-config"),
    pytest.param(
        ["attack.pgd.steps=100"],
        ["not selected", "attack=[fgsm,apgd,apgd_t,pgd]"],
        id="setting-of-unselected-attack",
    ),
]


# -- the workspace: what earlier runs left behind ----------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB", seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)
    return path


def _image_trees(root: Path) -> None:
    """Class-per-folder trees, each broken in one way (and one that is fine)."""
    for name in ("ok", "corrupt", "zero_byte", "truncated"):
        for label in ("cat", "dog"):
            for i in range(3):
                _png(root / name / label / f"{i}.png", seed=i)
    (root / "corrupt" / "dog" / "broken.png").write_bytes(random.Random(0).randbytes(300))
    (root / "zero_byte" / "dog" / "empty.png").write_bytes(b"")
    whole = _png(root / "truncated" / "dog" / "cut.png", size=(64, 64)).read_bytes()
    (root / "truncated" / "dog" / "cut.png").write_bytes(whole[: len(whole) // 2])
    _png(root / "one_class" / "cat" / "0.png")
    _png(root / "empty_class" / "cat" / "0.png")
    _png(root / "empty_class" / "cat" / "1.png")
    (root / "empty_class" / "dog").mkdir(parents=True)
    (root / "empty_class" / "dog" / "notes.txt").write_text("not an image")
    _png(root / "singletons" / "cat" / "0.png")
    _png(root / "singletons" / "dog" / "0.png")


def _previous_run(store: str) -> str:
    """A finished run of the default experiment, as an earlier `robustcnn run` would have left."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name("robustcnn")
    experiment_id = found.experiment_id if found else client.create_experiment("robustcnn")
    run = client.create_run(experiment_id, run_name="earlier-job", tags={"model": "lenet5"})
    client.log_param(run.info.run_id, "seed", "0")
    client.log_metric(run.info.run_id, "clean_accuracy", 0.979)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the store (whose bytes change legitimately)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("mlflow.db")
    }


def store_runs(db: Path) -> dict[str, tuple[Any, ...]]:
    """run id -> (status, end time, lifecycle, its metrics, its params), read from the sqlite store."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        runs = conn.execute("SELECT run_uuid, status, end_time, lifecycle_stage FROM runs").fetchall()
        metrics = conn.execute("SELECT run_uuid, key, value, step FROM metrics").fetchall()
        params = conn.execute("SELECT run_uuid, key, value FROM params").fetchall()
    return {
        run_id: (
            status,
            end,
            stage,
            sorted(m[1:] for m in metrics if m[0] == run_id),
            sorted(p[1:] for p in params if p[0] == run_id),
        )
        for run_id, status, end, stage in runs
    }


@contextlib.contextmanager
def _process_state() -> Iterator[None]:
    """Undo what an in-process job changes globally: logging (Hydra reconfigures it), RNGs, threads."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    others = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads())
    try:
        yield
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()  # hydra.main leaves it initialized; compose() elsewhere clears it too
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (hs, lvl, propagate) in others.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate = hs, lvl, propagate
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.set_num_threads(rng[3])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Iterator[dict[str, Any]]:
    """One working directory for every case, holding what earlier runs left, hashed before any case."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copy(empty_store, root / "mlflow.db")
    store = f"sqlite:///{root / 'mlflow.db'}"
    earlier = root / "outputs" / "2020-01-01" / "00-00-00"
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / "results.json").write_text('{"clean_accuracy": 0.979, "model": "lenet5"}')
    (earlier / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (earlier / "robustness_curve.png").write_bytes(b"\x89PNG earlier plot")
    sweep = root / "multirun" / "2020-01-01" / "00-00-00"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text('{"clean_accuracy": 0.5}')
    (sweep / "sweep_summary.json").write_text('{"jobs": 1}')
    (root / "cache").mkdir()
    (root / "cache" / "0123456789abcdef.safetensors").write_bytes(b"weights of an earlier job")
    (root / "cache" / "0123456789abcdef.json").write_text('{"key": "0123456789abcdef"}')
    (root / "reports" / "robustcnn").mkdir(parents=True)
    (root / "reports" / "robustcnn" / "index.html").write_text("<html>earlier report</html>")
    (root / "a_file.txt").write_text("not a folder")
    _image_trees(root / "images")
    with pytest.MonkeyPatch.context() as mp, _process_state():
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.setenv("ROBUSTCNN_CACHE_DIR", str(root / "cache"))
        for name in ("HYDRA_FULL_ERROR", "ROBUSTCNN_DEBUG", "PYTHONHASHSEED"):
            mp.delenv(name, raising=False)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(root)
        earlier_run = _previous_run(store)
        yield {
            "root": root,
            "db": root / "mlflow.db",
            "files": file_hashes(root),
            "runs": store_runs(root / "mlflow.db"),
            "earlier_run": earlier_run,
        }


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str, str]:
    """``robustcnn run ARGS`` in this process: (exit code, stdout, stderr)."""
    from robustcnn.cli import main

    capsys.readouterr()
    code: Any = 0
    try:
        main(["run", *args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_nothing_lost(before_files: dict[str, str], before_runs: dict[str, Any], workspace: dict) -> None:
    after_files = file_hashes(workspace["root"])
    changed = sorted(k for k, digest in before_files.items() if after_files.get(k) != digest)
    assert not changed, f"files written before were changed or removed: {changed}"
    after_runs = store_runs(workspace["db"])
    assert {k: after_runs.get(k) for k in before_runs} == before_runs, "an earlier MLflow run changed"
    new_runs = sorted(set(after_runs) - set(before_runs))
    assert not new_runs, f"a bad input started MLflow run(s) {new_runs}"
    new_results = sorted(k for k in after_files if k.endswith("results.json") and k not in before_files)
    assert not new_results, f"a bad input wrote results: {new_results}"


@pytest.mark.parametrize(("overrides", "expected"), RUN_CASES)
def test_bad_run_input_is_one_line_and_exit_2(
    overrides: list[str], expected: str, workspace: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    before_files, before_runs = file_hashes(workspace["root"]), store_runs(workspace["db"])
    args = [o.replace("{root}", str(workspace["root"])) for o in overrides]
    code, out, err = run_cli(args, capsys)
    assert "Traceback" not in err + out, err
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("robustcnn: error: "), lines[0]
    assert expected in lines[0], f"{expected!r} not named in: {lines[0]}"
    assert len(lines[0]) < 600, f"the error line is {len(lines[0])} characters long"
    assert_nothing_lost(before_files, before_runs, workspace)


@pytest.mark.parametrize(("overrides", "expected"), COMPOSE_CASES)
def test_override_hydra_refuses_is_exit_2_without_traceback(
    overrides: list[str], expected: list[str], workspace: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    before_files, before_runs = file_hashes(workspace["root"]), store_runs(workspace["db"])
    code, out, err = run_cli(overrides, capsys)
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err + out, err
    for text in expected:
        assert text in err, f"{text!r} not in Hydra's message:\n{err}"
    first = next(line for line in err.splitlines() if line.strip())
    assert "HYDRA_FULL_ERROR" not in first, "the first line must name the problem"
    assert_nothing_lost(before_files, before_runs, workspace)


@pytest.mark.parametrize(
    "overrides", [["attack.pgd.steps=100"], ["attack=[fgsm]", "attack.apgd.loss=dlr"], ["a.b=1"]]
)
def test_an_override_of_a_key_the_config_lacks_is_one_line_with_the_fix(
    overrides: list[str], workspace: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(overrides, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("robustcnn: error: "), err
    key = overrides[-1].split("=")[0]
    assert key in lines[0] and ("attack=[" in lines[0] or f"+{key}=" in lines[0]), lines[0]


def test_nothing_written_before_is_lost(workspace: dict) -> None:
    """After every bad case above: the earlier files, and the earlier run, exactly as they were."""
    after = file_hashes(workspace["root"])
    assert {k: after.get(k) for k in workspace["files"]} == workspace["files"]
    runs = store_runs(workspace["db"])
    assert {k: runs.get(k) for k in workspace["runs"]} == workspace["runs"]
    earlier = runs[workspace["earlier_run"]]
    assert earlier[0] == "FINISHED" and ("clean_accuracy", 0.979, 0) in earlier[3]


@pytest.mark.slow
def test_in_process_rows_behave_like_the_real_command(workspace: dict) -> None:
    """The table runs through cli.main in-process for speed; one row through the console script."""
    import subprocess
    import sys

    before_files, before_runs = file_hashes(workspace["root"]), store_runs(workspace["db"])
    out = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "run", "training.epochs=abc"],
        cwd=workspace["root"],
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        "robustcnn: error: training.epochs='abc' must be a whole number"
    ]
    assert_nothing_lost(before_files, before_runs, workspace)


def test_a_batch_size_of_zero_never_loops_forever() -> None:
    from robustcnn.batching import in_batches
    from robustcnn.errors import ConfigError

    calls = []

    def work(begin: int, end: int) -> None:
        calls.append((begin, end))
        if len(calls) > 100:
            raise AssertionError("in_batches is looping on empty slices")

    with pytest.raises(ConfigError, match="eval.batch_size"):
        in_batches(work, 10, 0, what="clean accuracy", setting="eval.batch_size")


# -- decided: accepted -------------------------------------------------------------------------------


def test_empty_attack_list_is_accepted_as_documented() -> None:
    """`attack=[]` is documented (conf/config.yaml) as "no attacks": clean accuracy only."""
    from robustcnn.config import compose
    from robustcnn.evaluation.settings import plan_attacks
    from robustcnn.jobs.inputs import to_container

    config = to_container(compose(["attack=[]"]))
    assert plan_attacks(config) == (None, [])


def test_max_test_above_the_split_means_all(mnist_small) -> None:
    from robustcnn.data import load_dataset

    data = load_dataset("mnist5k", max_test=10**9, max_train=10**9)
    assert data.y_test.shape[0] == mnist_small.y_test.shape[0] == 1000


def test_images_of_another_size_or_mode_are_resized_and_converted(tmp_path: Path) -> None:
    from robustcnn.data import load_dataset

    for i, (size, mode) in enumerate(
        [((8, 8), "RGB"), ((40, 20), "L"), ((5, 50), "RGBA"), ((32, 32), "RGB")]
    ):
        _png(tmp_path / "cat" / f"{i}.png", size, mode, seed=i)
        _png(tmp_path / "dog" / f"{i}.png", size, mode, seed=10 + i)
    for channels in (1, 3):
        data = load_dataset("image_folder", root=str(tmp_path), image_size=[16, 12], channels=channels)
        assert tuple(data.x_train.shape[1:]) == (channels, 16, 12)
        assert bool(torch.isfinite(data.x_train).all()) and float(data.x_train.max()) <= 1.0


def test_eps_list_is_capped() -> None:
    from robustcnn.errors import ConfigError
    from robustcnn.threat import MAX_EPS, ThreatModel

    assert len(ThreatModel.from_mapping({"eps": [i / MAX_EPS for i in range(MAX_EPS)]}).eps) == MAX_EPS
    for n in (MAX_EPS + 1, 10_000):
        with pytest.raises(ConfigError, match="threat.eps has") as info:
            ThreatModel.from_mapping({"eps": [i / n for i in range(n)]})
        assert "\n" not in str(info.value) and len(str(info.value)) < 300


# -- hypothesis: every numeric setting, straight into the validation layer ---------------------------


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return _real(v) and float(v).is_integer()


def _strict_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _train(path: str) -> Callable[[Any], Any]:
    from robustcnn.training.loop import TrainConfig

    return lambda v: TrainConfig.from_mapping(_nested(path, v))


def _attack(name: str, key: str, **extra: Any) -> Callable[[Any], Any]:
    from robustcnn.attacks import build_attack

    return lambda v: build_attack({"name": name, **extra, key: v})


def _defense(name: str, key: str) -> Callable[[Any], Any]:
    from robustcnn.defenses import build_defense

    return lambda v: build_defense({"name": name, key: v})


def _threat(mapping: Callable[[Any], dict[str, Any]]) -> Callable[[Any], Any]:
    from robustcnn.threat import ThreatModel

    return lambda v: ThreatModel.from_mapping(mapping(v))


def _checks(key: str) -> Callable[[Any], Any]:
    from robustcnn.evaluation.battery import BatterySettings

    return lambda v: BatterySettings.from_mapping({key: v})


def _common(key: str) -> Callable[[Any], Any]:
    from robustcnn.attacks import build_attack

    return lambda v: build_attack({"name": "fgsm"}, {key: v})


def _threads(v: Any) -> Any:
    from robustcnn.device import set_threads

    before = torch.get_num_threads()
    try:
        return set_threads(v)
    finally:
        torch.set_num_threads(before)


def _fraction(v: Any) -> Any:
    from robustcnn.data.validate import check_fraction

    return check_fraction(v, "test_fraction")


# key named in the error (plus a variant in brackets) -> (validate(value), accepted(value)); null is
# accepted only where it is documented (step_size, max_batches, reference_eps, target_class, threads)
NUMERIC_SETTINGS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], bool]]] = {
    "threat.eps": (_threat(lambda v: {"eps": [v]}), lambda v: _real(v) and 0 <= v <= 1),
    # the same key under the l2 norm (no upper bound until the input size is known)
    "threat.eps (l2)": (_threat(lambda v: {"eps": [0.0, v], "norm": "l2"}), lambda v: _real(v) and v > 0),
    "threat.reference_eps": (
        _threat(lambda v: {"eps": [0.0, 0.1, 0.3], "reference_eps": v}),
        lambda v: v is None or (_real(v) and v in (0.0, 0.1, 0.3)),
    ),
    "threat.target_class": (
        _threat(lambda v: {"target_class": v}),
        lambda v: v is None or (_whole(v) and v >= 0),
    ),
    "training.epochs": (_train("epochs"), lambda v: _whole(v) and v >= 0),
    "training.batch_size": (_train("batch_size"), lambda v: _whole(v) and v >= 1),
    "training.max_batches": (_train("max_batches"), lambda v: v is None or (_whole(v) and v >= 1)),
    "training.optimizer.lr": (_train("optimizer.lr"), lambda v: _real(v) and v > 0),
    "training.optimizer.momentum": (_train("optimizer.momentum"), lambda v: _real(v) and 0 <= v < 1),
    "training.optimizer.weight_decay": (_train("optimizer.weight_decay"), lambda v: _real(v) and v >= 0),
    "training.scheduler.gamma": (_train("scheduler.gamma"), lambda v: _real(v) and v > 0),
    "training.scheduler.step_size": (_train("scheduler.step_size"), lambda v: _whole(v) and v >= 1),
    "training.augment.shift": (_train("augment.shift"), lambda v: _whole(v) and v >= 0),
    "defense.sparsity": (_defense("prune", "sparsity"), lambda v: _real(v) and 0 <= v < 1),
    "defense.finetune_eps": (_defense("prune", "finetune_eps"), lambda v: _real(v) and 0 < v <= 1),
    "defense.iterations": (_defense("prune", "iterations"), lambda v: _strict_int(v) and v >= 1),
    "defense.rate": (_defense("dropout", "rate"), lambda v: _real(v) and 0 <= v < 1),
    "defense.n_samples": (_defense("dropout", "n_samples"), lambda v: _whole(v) and v >= 1),
    "defense.eps": (_defense("pgd_at", "eps"), lambda v: _real(v) and 0 <= v <= 1),
    "defense.steps": (_defense("pgd_at", "steps"), lambda v: _whole(v) and v >= 1),
    "defense.warmup_epochs": (_defense("pgd_at", "warmup_epochs"), lambda v: _real(v) and v >= 0),
    "defense.beta": (_defense("trades", "beta"), lambda v: _real(v) and v >= 0),
    "defense.collapse_ratio": (_defense("fgsm_at", "collapse_ratio"), lambda v: _real(v) and 0 <= v <= 1),
    "defense.strength": (_defense("l1", "strength"), lambda v: _real(v) and v >= 0),
    "defense.strength (weight decay)": (_defense("weight_decay", "strength"), lambda v: _real(v) and v >= 0),
    "defense.strength (ig)": (_defense("input_gradient", "strength"), lambda v: _real(v) and v >= 0),
    "defense.zero_threshold": (_defense("l1", "zero_threshold"), lambda v: _real(v) and v >= 0),
    "defense.finetune_epochs (l1)": (_defense("l1", "finetune_epochs"), lambda v: _whole(v) and v >= 1),
    "attack.pgd.steps": (_attack("pgd", "steps"), lambda v: _whole(v) and v >= 1),
    "attack.pgd.restarts": (_attack("pgd", "restarts"), lambda v: _whole(v) and v >= 1),
    "attack.pgd.step_size": (_attack("pgd", "step_size"), lambda v: v is None or (_real(v) and v > 0)),
    "attack.pgd.rel_step_size": (_attack("pgd", "rel_step_size"), lambda v: _real(v) and v > 0),
    "attack.apgd.steps": (_attack("apgd", "steps"), lambda v: _whole(v) and v >= 2),
    "attack.apgd_t.target_classes": (_attack("apgd_t", "target_classes"), lambda v: _whole(v) and v >= 1),
    "attack.fmn.steps": (_attack("fmn", "steps"), lambda v: _whole(v) and v >= 1),
    "attack.fmn.step_size": (_attack("fmn", "step_size"), lambda v: _real(v) and 0 < v < math.inf),
    "attack.fmn.gamma": (_attack("fmn", "gamma"), lambda v: _real(v) and 0.001 <= v < 1),
    "attack.square.queries": (_attack("square", "queries"), lambda v: _whole(v) and v >= 1),
    "attack.square.p_init": (_attack("square", "p_init"), lambda v: _real(v) and 0 < v <= 1),
    "attack.square.progress_window": (
        _attack("square", "progress_window"),
        lambda v: v is None or (_whole(v) and v >= 1),
    ),
    "attack.noise.samples": (_attack("noise", "samples"), lambda v: _whole(v) and v >= 1),
    "attack.eot.samples": (_attack("eot", "samples"), lambda v: _whole(v) and v >= 1),
    "attack.transfer.rel_step_size": (_attack("transfer", "rel_step_size"), lambda v: _real(v) and v > 0),
    "eval.attack_batch_size": (_common("batch_size"), lambda v: _whole(v) and v >= 1),
    "eval.keep_examples": (_common("keep_examples"), lambda v: _whole(v) and v >= 0),
    "checks.tolerance": (_checks("tolerance"), lambda v: _real(v) and 0 <= v <= 1),
    "checks.probe_samples": (_checks("probe_samples"), lambda v: _whole(v) and v >= 1),
    "checks.monotone_samples": (_checks("monotone_samples"), lambda v: _whole(v) and v >= 1),
    "checks.monotone_steps": (_checks("monotone_steps"), lambda v: _whole(v) and v >= 2),
    "checks.strong_steps_factor": (_checks("strong_steps_factor"), lambda v: _real(v) and v >= 1),
    "threads": (_threads, lambda v: v is None or (_whole(v) and 1 <= v <= 1024)),
    "data.test_fraction": (_fraction, lambda v: _real(v) and 0 < v < 1),
}

#: Numbers of every kind (NaN, +-inf, -0.0, huge, tiny, the range ends 0, 1, 2) and non-numbers.
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=3.0),
    st.integers(min_value=-(10**6), max_value=10**12),
    st.integers(min_value=-2, max_value=5),
    st.sampled_from(
        [
            0,
            1,
            2,
            -1,
            0.0,
            1.0,
            2.0,
            -0.0,
            0.5,
            1e-300,
            1e308,
            math.nan,
            math.inf,
            -math.inf,
            2**40,
            1024,
            1025,
        ]
    ),
    st.sampled_from([None, True, False, "abc", "1", "", [], [1], {}, {"a": 1}]),
)
EXAMPLES_PER_SETTING = 50


@pytest.mark.parametrize("key", sorted(NUMERIC_SETTINGS))
@settings(
    max_examples=EXAMPLES_PER_SETTING,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(value=VALUES)
def test_numeric_settings_are_validated_or_refused_with_the_key(key: str, value: Any) -> None:
    validate, accepted = NUMERIC_SETTINGS[key]
    name = key.split(" (")[0]  # "threat.eps (l2)" names threat.eps
    if accepted(value):
        validate(value)  # must not raise
        return
    with pytest.raises(RobustCNNError) as info:  # never ValueError / TypeError / KeyError ...
        validate(value)
    message = str(info.value)
    assert "\n" not in message, message
    assert name in message, f"{name!r} not named in: {message}"
