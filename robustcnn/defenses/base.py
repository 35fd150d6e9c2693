"""The Defense interface: how a defense changes a model, in the places the runner offers.

A defense may do any of five things, each optional, and the runner calls them in this order:

1. ``model_overrides``: change the model config before it is built (dropout rate);
2. ``training_overrides``: change the training settings (weight decay, coupled or decoupled);
3. ``hooks``: plug into the one training loop (adversarial examples, TRADES' loss, collapse guard,
   weight and input-gradient penalties);
4. ``post_train``: transform a trained model (pruning, then (adversarial) fine-tuning);
5. ``finalize``: set inference-time behaviour that is not in the weights (dropout kept on).

``base`` names the defense whose trained model this one starts from (``defense=prune
defense.base=pgd_at``); the runner obtains that model through the weight cache first, so it is
trained once however many defenses build on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from robustcnn.config import show
from robustcnn.errors import ConfigError
from robustcnn.models import Classifier
from robustcnn.training.loop import TrainHook, TrainResult

_REGISTRY: dict[str, type[Defense]] = {}


class JobFit(Protocol):
    """The job's training loop on its data and settings, handed to :meth:`Defense.post_train`.

    ``fit(model, hooks=[...], epochs=N)`` trains ``model`` in place (``epochs=None``: the job's).
    """

    def __call__(
        self, target: nn.Module, /, hooks: Sequence[TrainHook] = (), epochs: int | None = None
    ) -> TrainResult: ...


class Defense:
    """No defense: standard training. Subclasses override what they change."""

    name: ClassVar[str] = "none"
    #: Settings that act only at inference (not on the weights): left out of the cache key.
    inference_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, base: str | Mapping[str, Any] | None = None) -> None:
        if base is not None and not isinstance(base, (str, Mapping)):
            raise ConfigError(
                f"defense.base={show(base)} must be a defense name (e.g. none, pgd_at) or null "
                "(train from scratch)"
            )
        self.base = base

    @classmethod
    def keyword_settings(cls) -> frozenset[str]:
        """Settings ``__init__`` takes through ``**settings``, which its signature cannot name."""
        return frozenset()

    def params(self) -> dict[str, Any]:
        """The settings that define the defense (logged with the run)."""
        return {"base": self.base if not isinstance(self.base, Mapping) else dict(self.base)}

    def model_overrides(self) -> dict[str, Any]:
        return {}

    def training_overrides(self) -> dict[str, Any]:
        """:class:`~robustcnn.training.loop.TrainConfig` fields this defense sets, for its own training
        and fine-tuning only (the standard epoch it is costed against keeps the job's settings)."""
        return {}

    def hooks(self, seed: int, x_train: torch.Tensor, y_train: torch.Tensor) -> list[TrainHook]:
        """Training-loop hooks; ``x_train``/``y_train`` (on the training device) for held-out checks."""
        return []

    def post_train(
        self,
        model: nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        device: torch.device,
        fit: JobFit,
        seed: int,
    ) -> dict[str, Any]:
        """Transform the trained model in place; returns what to report (e.g. measured sparsity).

        ``fit(model, hooks=[...], epochs=N)`` runs the job's training loop (for fine-tuning).
        """
        return {}

    def prepare_for_load(self, model: Classifier, report: Mapping[str, Any]) -> Classifier:
        """Reshape a freshly built model to what ``post_train`` produced (e.g. pruned channels).

        ``report`` is what ``post_train`` returned when the cached weights were made; the runner
        calls this before loading them, so a physically smaller model loads into the right shapes.
        """
        return model

    def finalize(self, model: Classifier) -> None:
        """Inference-time settings that are not stored in the weights."""

    def report(self) -> dict[str, Any]:
        """Figures and events collected while training (logged as metrics/params)."""
        return {}


def register_defense(name: str) -> Callable[[type[Defense]], type[Defense]]:
    def decorate(cls: type[Defense]) -> type[Defense]:
        if name in _REGISTRY:
            raise ValueError(f"defense {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


register_defense("none")(Defense)


def available_defenses() -> list[str]:
    return sorted(_REGISTRY)


def build_defense(spec: Mapping[str, Any]) -> Defense:
    """Build a defense from its config node (``name`` plus settings); bad values fail before training."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"defense={show(spec)} must be a section; pick a preset, e.g. defense=pgd_at")
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown defense {show(name)}; choose from {', '.join(available_defenses())}")
    cls = _REGISTRY[name]
    accepted = accepted_settings(cls)
    unknown = sorted(str(k) for k in params if k not in accepted)
    if unknown:
        raise ConfigError(f"defense {name} has no setting(s) {unknown}; accepted: {sorted(accepted)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:  # a value of the wrong type that no check caught
        detail = " ".join(str(exc).split())
        raise ConfigError(f"defense {name}: {detail}; check the settings under defense.*") from exc


def accepted_settings(cls: type[Defense]) -> set[str]:
    """The keyword settings a defense class accepts (its ``__init__`` and its bases', and its
    :meth:`~Defense.keyword_settings`)."""
    keys: set[str] = set(cls.keyword_settings())
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                keys.add(p.name)
    return keys


def weights_identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved defense spec without its inference-only settings (recursively through ``base``).

    Two configs that differ only in how the model behaves at test time share trained weights.
    """
    name = spec.get("name")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    skip = set(cls.inference_settings) if cls else set()
    identity = {k: v for k, v in spec.items() if k not in skip}
    if isinstance(identity.get("base"), Mapping):
        identity["base"] = weights_identity(identity["base"])
    return identity
