"""The weight cache under concurrency and damage: one trainer per entry, never a damaged load.

Why processes, not threads: sweep workers are separate processes, and ``flock`` is what has to
exclude them; the children are plain ``python -c`` scripts so they start like a real worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from robustcnn.config import compose
from robustcnn.errors import CacheError
from robustcnn.jobs.inputs import load_data, to_container
from robustcnn.jobs.trained import make_model, obtain_model, weights_key
from robustcnn.training.cache import WeightCache

TINY = [
    "data.max_train=128",
    "data.max_test=32",
    "training.epochs=1",
    "training.max_batches=2",
    "training.batch_size=32",
    "attack=[]",
]

#: A sweep worker: wait at a barrier for its twin, then obtain the same model; print what it got.
WORKER = r"""
import hashlib, json, logging, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from robustcnn.config import compose
from robustcnn.jobs.inputs import load_data, to_container
import robustcnn.jobs.trained as trained

overrides, barrier, me = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
waits = []

class Spy(logging.Handler):
    def emit(self, record):
        if "waiting for another process" in record.getMessage():
            waits.append(record.getMessage())

cache_log = logging.getLogger("robustcnn.training.cache")
cache_log.setLevel(logging.INFO)
cache_log.addHandler(Spy())
config = to_container(compose(overrides))
data = load_data(config)
real_fit = trained.fit

def slow_fit(*args, **kwargs):
    time.sleep(1.0)  # widen the window: the twin must find the entry missing, not already saved
    return real_fit(*args, **kwargs)

trained.fit = slow_fit
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
got = trained.obtain_model(config, data, torch.device("cpu"), progress=False)
state = got.model.state_dict()
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
print(json.dumps({"cache_hit": got.cache_hit, "key": got.key, "digest": digest, "waited": waits}))
"""

#: Holds ``WeightCache(root).lock(key)`` for a while; prints when it has it and when it lets go.
HOLDER = r"""
import sys, time
from robustcnn.training.cache import WeightCache
root, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with WeightCache(root).lock(key):
    print("locked", flush=True)
    time.sleep(seconds)
    print(time.time(), flush=True)
"""


def _config(cache: Path, *overrides: str) -> dict:
    return to_container(compose([*TINY, f"paths.cache_dir={cache}", *overrides]))


def _digest(model: torch.nn.Module) -> str:
    state = model.state_dict()
    return hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()


def _hold_lock(root: Path, key: str, seconds: float) -> subprocess.Popen[str]:
    """Start a process holding the lock of ``key``; return once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), key, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_two_processes_missing_the_same_entry_train_it_once(tmp_path: Path) -> None:
    cache_dir, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    overrides = [*TINY, f"paths.cache_dir={cache_dir}"]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(overrides), str(barrier), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for name in ("a", "b")
    ]
    outputs = [w.communicate(timeout=180) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    assert sorted(g["cache_hit"] for g in got) == [False, True], "exactly one process trained"
    waiter = next(g for g in got if g["cache_hit"])
    assert [len(g["waited"]) for g in got].count(1) == 1 and waiter["waited"], "the other one waited, once"
    assert got[0]["key"] == got[1]["key"] and got[0]["digest"] == got[1]["digest"]

    key = got[0]["key"]
    cache = WeightCache(cache_dir)
    config = _config(cache_dir)
    fresh = make_model(config, load_data(config))
    assert cache.load(key, fresh) is not None, "the entry verifies (checksum) and loads strictly"
    assert _digest(fresh) == got[0]["digest"]
    leftovers = sorted(p.name for p in cache_dir.iterdir())
    assert leftovers == [f"{key}.json", f"{key}.lock", f"{key}.safetensors"], "no temporary files left"


def test_the_lock_excludes_another_process_until_it_lets_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WeightCache(tmp_path)
    holder = _hold_lock(tmp_path, "k", 1.5)
    asked = time.time()
    with caplog.at_level(logging.INFO, logger="robustcnn.training.cache"), cache.lock("k"):
        got = time.time()
    out, _ = holder.communicate(timeout=30)
    released = float(out.strip().splitlines()[-1])
    assert got >= released and got - asked > 0.75, "blocked until the holder released the lock"
    waits = [r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert waits == [f"waiting for another process to finish training weights k ({cache.lock_path('k')})"]
    assert cache.lock_path("k").exists(), "lock files stay (deleting one breaks flock)"


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path, "k", 60)
    holder.kill()
    holder.wait(timeout=10)
    started = time.time()
    with WeightCache(tmp_path).lock("k"):
        assert time.time() - started < 5


def test_lock_is_not_reentrant_and_discard_keeps_it(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    with cache.lock("derived"):
        with cache.lock("base"):  # a different key nests (a defense's base)
            pass
        with pytest.raises(CacheError, match="already held"):  # the same key raises, never hangs
            with cache.lock("derived"):
                pass
    with cache.lock("derived"):  # released on the way out, error or not
        cache.save("derived", torch.nn.Linear(2, 2), {})
        cache.discard("derived")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.lock", "derived.lock"]


def _truncate_weights(cache: WeightCache, key: str) -> None:
    path = cache.weights_path(key)
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_weight_byte(cache: WeightCache, key: str) -> None:
    path = cache.weights_path(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage_sidecar(cache: WeightCache, key: str) -> None:
    cache.meta_path(key).write_text('{"sha256": ')


def _sidecar_not_an_object(cache: WeightCache, key: str) -> None:
    cache.meta_path(key).write_text("[]")


def _wrong_checksum(cache: WeightCache, key: str) -> None:
    meta = json.loads(cache.meta_path(key).read_text())
    cache.meta_path(key).write_text(json.dumps({**meta, "sha256": "0" * 64}))


def _weights_missing(cache: WeightCache, key: str) -> None:
    cache.weights_path(key).unlink()


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_weights,
        _flip_a_weight_byte,
        _garbage_sidecar,
        _sidecar_not_an_object,
        _wrong_checksum,
        _weights_missing,
    ],
)
def test_obtain_model_rebuilds_a_damaged_entry(
    tmp_path: Path, damage: Callable[[WeightCache, str], None]
) -> None:
    config = _config(tmp_path / "cache")
    data = load_data(config)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    first = obtain_model(config, data, cpu, progress=False)
    cache = WeightCache(config["paths"]["cache_dir"])
    damage(cache, first.key)

    torch.manual_seed(0)
    again = obtain_model(config, data, cpu, progress=False)
    assert not again.cache_hit, "a damaged entry is retrained, never loaded"
    assert _digest(again.model) == _digest(first.model), "same seed, same weights: no trace of the damage"
    assert cache.load(first.key, make_model(config, data)) is not None, "the rebuilt entry verifies"
    assert obtain_model(config, data, cpu, progress=False).cache_hit


def test_a_damaged_shrunk_entry_retrains_the_full_architecture(tmp_path: Path) -> None:
    """prepare_for_load shrinks the model from the sidecar; damaged weights must not leave it shrunk."""
    config = _config(
        tmp_path / "cache",
        "defense=prune",
        "defense.method=l1_structured",
        "defense.base=null",
        "defense.finetune=none",
    )
    data = load_data(config)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    first = obtain_model(config, data, cpu, progress=False)
    assert first.meta["defense_report"]["shrunk"], "the setup must produce a physically smaller model"
    cache = WeightCache(config["paths"]["cache_dir"])
    _truncate_weights(cache, first.key)

    torch.manual_seed(0)
    again = obtain_model(config, data, cpu, progress=False)
    assert not again.cache_hit
    assert again.meta["defense_report"]["kept_channels"] == first.meta["defense_report"]["kept_channels"]
    assert _digest(again.model) == _digest(first.model)


def test_a_pooling_variant_never_loads_the_other_poolings_weights(tmp_path: Path) -> None:
    """Max- and average-pooled lenet5 have weights of the same shapes: only the key keeps them apart."""
    max_config = _config(tmp_path / "cache")
    avg_config = _config(tmp_path / "cache", "model.pooling=avg")
    data = load_data(max_config)
    older = {k: v for k, v in max_config["model"].items() if k != "pooling"}
    before_the_option = {**max_config, "model": older}
    assert weights_key(before_the_option, data) == weights_key(max_config, data), "old entries stay valid"
    assert weights_key(avg_config, data) != weights_key(max_config, data)
    cpu = torch.device("cpu")
    assert not obtain_model(max_config, data, cpu, progress=False).cache_hit
    averaged = obtain_model(avg_config, data, cpu, progress=False)
    assert not averaged.cache_hit, "the max-pooled entry must not be loaded into the average-pooled net"
    assert isinstance(averaged.model.net.pool, torch.nn.AvgPool2d)
    assert obtain_model(avg_config, data, cpu, progress=False).cache_hit
