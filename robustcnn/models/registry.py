"""Name -> builder registry of the model zoo, and the one factory the rest of robustcnn calls.

Builders are plain functions ``fn(*, in_channels, num_classes, input_size, dropout=0.0, **kw)``
returning the bare network; :func:`build_model` validates the configuration (so mistakes fail
with a message naming the fix rather than a shape error) and wraps the network in a
:class:`~robustcnn.models.classifier.Classifier` that owns normalization.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from robustcnn.errors import ConfigError, ModelError
from robustcnn.models.classifier import Classifier, check_input_shape, check_num_classes

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}
# Arguments build_model always passes; everything else in a builder's signature is a model option.
_STANDARD_ARGS = ("in_channels", "num_classes", "input_size", "dropout")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn`` as the builder of model ``name``.

    The builder must accept the keyword arguments ``in_channels``, ``num_classes``,
    ``input_size`` and ``dropout``; any other keyword it declares becomes an option that
    :func:`build_model` accepts (e.g. ``width``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}; pass a name such as 'my_cnn'")

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelError(
                f"model {name!r} is already registered (by {_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}); register yours under a different name"
            )
        params = inspect.signature(fn).parameters
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [a for a in _STANDARD_ARGS if a not in params and not takes_var_kw]
        if missing:
            raise ModelError(
                f"builder {fn.__qualname__} for model {name!r} does not accept {missing}; give it the "
                "signature fn(*, in_channels, num_classes, input_size, dropout=0.0, **options)"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _model_options(fn: Builder) -> tuple[list[str], bool]:
    """The extra keyword options a builder accepts, and whether it takes arbitrary ones."""
    options: list[str] = []
    var_kw = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in _STANDARD_ARGS:
            options.append(p.name)
    return options, var_kw


def model_label(name: str, options: Mapping[str, object]) -> str:
    """``name`` and every option that differs from its builder's default, e.g. ``lenet5 pooling=avg``.

    Why: run names, the sweep summary and the dashboard name a run by its model; two cells of a sweep
    over an option (``model.pooling=max,avg``) must not share a name. Options at their default are left
    out, so the standard network keeps its plain name.
    """
    fn = _REGISTRY.get(name)
    if fn is None:
        return name
    params = inspect.signature(fn).parameters
    changed = [
        f"{key}={value}"
        for key, value in sorted(options.items())
        if key != "name" and (key not in params or params[key].default != value)
    ]
    return " ".join([name, *changed])


def _check_dropout(dropout: float) -> float:
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, int | float)
        or not (math.isfinite(dropout) and 0.0 <= dropout < 1.0)
    ):
        raise ConfigError(
            f"model.dropout={dropout!r} must be a rate in [0, 1); use 0.0 for no dropout or e.g. 0.5"
        )
    return float(dropout)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    dropout: float = 0.0,
    **kwargs: object,
) -> Classifier:
    """Build registered model ``name`` for images shaped ``input_shape`` (C, H, W) in [0, 1].

    ``kwargs`` are model options (e.g. ``width`` for vgg11_small/resnet18/mobilenet_v2).
    Raises :class:`ModelError` for an unknown name or a too-small input and
    :class:`ConfigError` for an unknown option or an out-of-range value.
    """
    if name not in _REGISTRY:
        raise ModelError(
            f"unknown model {name!r}; valid names: {', '.join(available_models())} "
            "(set model.name to one of them)"
        )
    fn = _REGISTRY[name]
    options, var_kw = _model_options(fn)
    unknown = sorted(k for k in kwargs if k not in options)
    if unknown and not var_kw:
        accepted = ", ".join(options) if options else "none"
        raise ConfigError(
            f"model {name!r} does not accept option(s) {', '.join(map(repr, unknown))}; accepted "
            f"options: {accepted} (plus dropout); remove or rename the key"
        )
    shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    rate = _check_dropout(dropout)
    channels, height, width = shape
    net = fn(
        in_channels=channels, num_classes=num_classes, input_size=(height, width), dropout=rate, **kwargs
    )
    return Classifier(net, mean=mean, std=std, input_shape=shape, num_classes=num_classes, name=name)
