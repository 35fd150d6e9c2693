"""Defenses through the runner: dropout modes, composition through the cache, bad settings refused early."""

from __future__ import annotations

import pytest

from robustcnn.config import compose
from robustcnn.errors import ConfigError
from robustcnn.jobs.dispatch import run_job
from robustcnn.jobs.inputs import load_data, to_container
from robustcnn.jobs.trained import obtain_model, resolve_defense

TINY = ["data.max_train=600", "data.max_test=100", "training.epochs=1", "training.batch_size=50", "attack=[]"]


def _config(*overrides: str) -> dict:
    return to_container(compose([*TINY, *overrides]))


def test_dropout_modes(isolated: dict) -> None:
    import torch

    config = _config("defense=dropout", "defense.rate=0.4")
    data = load_data(config)
    trained = obtain_model(config, data, torch.device("cpu"), progress=False)
    from robustcnn.models.dropout import InferenceDropout

    rates = [m.p for m in trained.model.modules() if isinstance(m, InferenceDropout)]
    assert rates == [pytest.approx(0.4)], "the defense sets the zoo model's dropout rate"
    assert not trained.model.stochastic
    config = _config("defense=dropout", "defense.rate=0.4", "defense.mode=inference", "defense.n_samples=4")
    inference = obtain_model(config, data, torch.device("cpu"), progress=False)
    assert inference.cache_hit, "inference-time dropout does not change the weights: same cache entry"
    assert inference.model.stochastic and inference.model.inference_samples == 4


def test_composition_trains_the_base_once_and_reuses_it(isolated: dict) -> None:
    import torch

    base = "defense.base={name: dropout, rate: 0.2, mode: train_only}"
    first = _config("defense=prune", base, "defense.sparsity=0.5", "defense.finetune=none")
    data = load_data(first)
    a = obtain_model(first, data, torch.device("cpu"), progress=False)
    second = _config("defense=prune", base, "defense.sparsity=0.8", "defense.finetune=none")
    b = obtain_model(second, data, torch.device("cpu"), progress=False)
    assert a.meta["base_key"] == b.meta["base_key"] and a.key != b.key
    entries = sorted(p.stem for p in isolated["cache"].glob("*.safetensors"))
    assert len(entries) == 3, "one base model and two pruned ones"
    assert b.meta["defense_report"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    again = obtain_model(second, data, torch.device("cpu"), progress=False)
    assert again.cache_hit


def test_base_by_name_resolves_the_preset() -> None:
    resolved = resolve_defense({"name": "prune", "base": "dropout"})
    assert resolved["base"]["name"] == "dropout" and "rate" in resolved["base"]
    with pytest.raises(ConfigError, match="not a defense"):
        resolve_defense({"name": "prune", "base": "armour"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["defense=prune", "defense.sparsity=1.5"], "sparsity"),
        (["defense=dropout", "defense.rate=1.0"], "rate"),
        (["defense=prune", "defense.base=armour"], "not a defense"),
        (["defense=prune", "defense.finetune_epochs=-1"], "finetune_epochs"),
    ],
)
def test_bad_defense_settings_fail_before_training(
    isolated: dict, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_job(compose([*TINY, *overrides]), progress=False)
    assert not list(isolated["cache"].glob("*.safetensors")), "nothing may be trained before the error"
