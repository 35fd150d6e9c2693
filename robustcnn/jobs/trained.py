"""A trained, defended model for a config: from the weight cache, or trained (and then cached).

Why its own module: this is where defenses meet the training loop and the cache, and where
composition happens: ``defense.base`` names the defense whose trained model this one starts
from; that base is obtained through this same function, so it is trained once and then shared by
every defense, sweep and job that builds on it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from robustcnn import __version__
from robustcnn.config import conf_dir, config_groups
from robustcnn.data import Dataset
from robustcnn.defenses import Defense, build_defense, weights_identity
from robustcnn.errors import ConfigError
from robustcnn.hashing import config_hash
from robustcnn.models import Classifier, build_model
from robustcnn.training.cache import WeightCache
from robustcnn.training.loop import TrainConfig, TrainHook, TrainResult, fit

log = logging.getLogger(__name__)

#: Bump when a change to training code changes the weights a config produces (invalidates caches).
TRAINING_CODE_VERSION = 2
#: Training settings that do not change the learned weights, so they stay out of the cache key.
_NOT_IN_KEY = ("use_cache",)
#: Model options added after weight caches existed, with the value every earlier entry was trained
#: with: at that value an option stays out of the key, so the entries cached before it stay valid
#: (any other value is in the key: an average-pooled network never loads a max-pooled one's weights).
_ADDED_OPTIONS: dict[str, object] = {"pooling": "max"}
#: Batches timed to estimate a standard (clean) epoch, for the cost ratio of defended training.
_STANDARD_EPOCH_PROBE_BATCHES = 20


@dataclass
class TrainedModel:
    model: Classifier
    key: str
    cache_hit: bool
    train: TrainResult | None
    meta: dict[str, Any]
    defense: Defense


def resolve_defense(spec: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """The defense node with ``base`` expanded: a name becomes that preset's settings (recursively)."""
    if depth > 8:
        raise ConfigError("defense.base chains more than 8 defenses (a cycle?); check defense.base")
    resolved = dict(spec)
    base = resolved.get("base")
    if isinstance(base, str):
        preset = conf_dir() / "defense" / f"{base}.yaml"
        if not preset.is_file():
            choices = config_groups()["defense"]
            raise ConfigError(f"defense.base={base!r} is not a defense; choose one of {choices}")
        base = OmegaConf.to_container(OmegaConf.load(preset), resolve=True)
    if isinstance(base, Mapping):
        resolved["base"] = resolve_defense(base, depth + 1)
    return resolved


def make_model(
    config: dict[str, Any], data: Dataset, overrides: Mapping[str, Any] | None = None
) -> Classifier:
    section = {**config["model"], **(overrides or {})}
    name = section.pop("name", None)
    if not name:
        raise ConfigError("the model config has no 'name'; pick a preset such as model=lenet5")
    info = data.info
    return build_model(
        name,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        **section,
    )


def weights_key(config: dict[str, Any], data: Dataset) -> str:
    """Hash of everything that determines the trained weights (and nothing else)."""
    training = {k: v for k, v in config["training"].items() if k not in _NOT_IN_KEY}
    return config_hash(
        {
            "code": TRAINING_CODE_VERSION,
            # what fixes the training data; test-split fields (test_*) do not change the weights
            "data": {k: v for k, v in data.info.identity.items() if not k.startswith("test_")},
            "model": {
                k: v for k, v in config["model"].items() if k not in _ADDED_OPTIONS or v != _ADDED_OPTIONS[k]
            },
            "training": training,
            "defense": weights_identity(resolve_defense(config["defense"])),
            "seed": config["seed"],
        }
    )


def standard_epoch_seconds(
    model: Classifier, data: Dataset, train_config: TrainConfig, device: torch.device, seed: int
) -> float:
    """Time a few clean-training batches on a throwaway copy and scale to one epoch."""
    steps = -(-data.x_train.shape[0] // train_config.batch_size)
    probe = min(steps, _STANDARD_EPOCH_PROBE_BATCHES)
    config = dataclasses.replace(train_config, epochs=1, max_batches=probe)
    result = fit(copy.deepcopy(model), data.x_train, data.y_train, config, device, seed=seed, progress=False)
    return result.history[0]["epoch_seconds"] * steps / probe


def obtain_model(
    config: dict[str, Any], data: Dataset, device: torch.device, progress: bool = True
) -> TrainedModel:
    """Cached weights when they exist, else train (or start from the base defense) and cache them.

    A miss is filled under the entry's cross-process lock, and the cache is read again once the
    lock is held: two sweep workers that need the same model train it once, the second one loads
    what the first saved. While filling an entry with a ``defense.base``, the base's own lock is
    taken inside this one; a base's key always differs from its derived defense's (its identity is
    nested inside the derived one's), and locks are only ever taken from derived to base, so
    processes cannot deadlock on each other.
    """
    spec = resolve_defense(config["defense"])
    defense = build_defense(spec)
    # built once, before anything else, as ever: its random init must not depend on the cache state
    model = make_model(config, data, defense.model_overrides())
    key = weights_key(config, data)
    if not bool(config["training"].get("use_cache", True)):
        return _train(model, config, data, device, progress, spec, defense, key, cache=None)
    cache = WeightCache(config["paths"]["cache_dir"])
    cache.ensure_writable()
    cached = _from_cache(cache, key, model, defense, device)
    if cached is not None:
        return cached
    with cache.lock(key):
        cached = _from_cache(cache, key, model, defense, device)  # filled while we waited?
        if cached is not None:
            return cached
        cache.discard(key)  # leftovers of a damaged entry (an orphan sidecar) never pair with new weights
        return _train(model, config, data, device, progress, spec, defense, key, cache)


def _from_cache(
    cache: WeightCache, key: str, fresh: Classifier, defense: Defense, device: torch.device
) -> TrainedModel | None:
    """The verified cache entry ``key`` loaded into a copy of ``fresh``; ``None`` on a miss or damage.

    Why a copy: ``prepare_for_load`` may reshape it (pruned channels) from the sidecar; if the
    weights then turn out damaged, the model trained instead must not inherit that shape.
    """
    stored = cache.read_meta(key)
    if stored is None:
        return None
    model = defense.prepare_for_load(copy.deepcopy(fresh), stored.get("defense_report") or {})
    meta = cache.load(key, model)
    if meta is None:
        return None
    log.info("weights %s found in the cache (%s): training skipped", key, cache.weights_path(key))
    defense.finalize(model)
    return TrainedModel(model.to(device).eval(), key, True, None, meta, defense)


def _train(
    model: Classifier,
    config: dict[str, Any],
    data: Dataset,
    device: torch.device,
    progress: bool,
    spec: dict[str, Any],
    defense: Defense,
    key: str,
    cache: WeightCache | None,
) -> TrainedModel:
    """Train ``model`` (or start from the base defense's model), post-train it, save it to ``cache``."""
    standard_config = TrainConfig.from_mapping(config["training"])
    train_config = defended_config(standard_config, defense)
    seed = int(config["seed"])
    base_key = None
    result: TrainResult | None = None
    if defense.base is not None:
        base = obtain_model({**config, "defense": spec["base"]}, data, device, progress)
        base_key = base.key
        model = _start_from(base, model, spec)
    else:
        result = _fit_defended(
            model, config, data, train_config, device, defense, spec["name"], seed, progress
        )

    def run_fit(
        target: torch.nn.Module, hooks: Sequence[TrainHook] = (), epochs: int | None = None
    ) -> TrainResult:
        cfg = train_config if epochs is None else dataclasses.replace(train_config, epochs=int(epochs))
        return fit(target, data.x_train, data.y_train, cfg, device, hooks=hooks, seed=seed, progress=progress)

    started = time.perf_counter()
    report = dict(defense.post_train(model, data.x_train, data.y_train, device, run_fit, seed))
    post_seconds = time.perf_counter() - started
    report.update(defense.report())
    if result is not None and spec["name"] != "none" and result.history:
        report.update(_epoch_cost(result, model, data, standard_config, device, seed))
    meta = {
        "model": config["model"],
        "data": data.info.identity,
        "training": config["training"],
        "defense": spec,
        "defense_report": report,
        "base_key": base_key,
        "seed": seed,
        "device": str(device),
        "train_seconds": (result.seconds if result else 0.0) + post_seconds,
        "train_images_per_s": result.images_per_s if result else None,
        "history": result.history if result else [],
        "robustcnn_version": __version__,
    }
    if cache is not None:
        cache.save(key, model, meta)
    defense.finalize(model)
    return TrainedModel(model.to(device).eval(), key, False, result, meta, defense)


def defended_config(standard: TrainConfig, defense: Defense) -> TrainConfig:
    """The job's training settings with the defense's own (weight decay), checked like the job's."""
    overrides = defense.training_overrides()
    if not overrides:
        return standard
    defended = dataclasses.replace(standard, **overrides)
    defended.validate()
    return defended


def _start_from(base: TrainedModel, model: Classifier, spec: dict[str, Any]) -> Classifier:
    """``model`` with the base defense's weights (a copy of the base when it changed the architecture)."""
    try:
        model.load_state_dict(base.model.state_dict())
    except RuntimeError:  # the base changed the architecture (e.g. pruned channels)
        model = copy.deepcopy(base.model)
    log.info("%s starts from the %s model (%s)", spec["name"], spec["base"]["name"], base.key)
    return model


def _fit_defended(
    model: Classifier,
    config: dict[str, Any],
    data: Dataset,
    train_config: TrainConfig,
    device: torch.device,
    defense: Defense,
    defense_name: str,
    seed: int,
    progress: bool,
) -> TrainResult:
    """Train from scratch with the defense's training hooks (adversarial examples, penalties)."""
    model_name, epochs = config["model"]["name"], train_config.epochs
    log.info("training %s on %s (%d epochs, defense %s)", model_name, data.info.name, epochs, defense_name)
    hooks = defense.hooks(seed, data.x_train.to(device), data.y_train.to(device))
    return fit(
        model, data.x_train, data.y_train, train_config, device, hooks=hooks, seed=seed, progress=progress
    )


def _epoch_cost(
    result: TrainResult,
    model: Classifier,
    data: Dataset,
    train_config: TrainConfig,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """A defended epoch against a standard one, both measured on this machine in this job."""
    standard = standard_epoch_seconds(model, data, train_config, device, seed)
    per_epoch = result.seconds / len(result.history)
    return {
        "epoch_seconds": per_epoch,
        "standard_epoch_seconds": standard,
        "epoch_cost_ratio": per_epoch / standard,
    }
