"""Checks, layers and initialisation the zoo builders share (lenet, madry, vgg, resnet, mobilenet)."""

from __future__ import annotations

import math

from torch import nn

from robustcnn.errors import ConfigError, ModelError


def require_input_size(model: str, input_size: tuple[int, int], minimum: int, why: str) -> None:
    """Raise :class:`ModelError` when an image side is below the architecture's minimum.

    Fails at build time with the minimum in the message instead of deep inside a forward pass
    with an opaque shape error (or, worse, silently pooling padding only).
    """
    height, width = input_size
    if height < minimum or width < minimum:
        raise ModelError(
            f"model {model!r} needs inputs of at least {minimum}x{minimum} pixels ({why}), got "
            f"{height}x{width}; resize/pad the images to >= {minimum}x{minimum} or pick a model "
            "with fewer down-sampling stages"
        )


def check_width(model: str, width: float) -> float:
    """Validate a channel multiplier and return it as a float."""
    if (
        isinstance(width, bool)
        or not isinstance(width, int | float)
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ConfigError(
            f"model {model!r}: width must be a number > 0 (channel multiplier), got {width!r}; "
            "use 1.0 for the standard network or e.g. 0.25 for a thinner one"
        )
    return float(width)


#: The down-sampling choices of the zoo models that pool (``model.pooling``); the first is the default.
POOLING = ("max", "avg")


def pooling_layer(model: str, pooling: str, *, ceil_mode: bool = False) -> nn.Module:
    """A 2x2 stride-2 down-sampling layer: max-pool (the published architectures) or average pool.

    Why a choice: max-pooling passes on one input per window and so routes the gradient through it
    alone, average pooling spreads it over the window; which one a network uses is an architecture
    lever whose effect on robustness a study can measure. Neither has weights, so the two variants'
    weights have the same shapes: only the weight cache's key keeps one from loading the other's.
    """
    if pooling == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode)
    if pooling == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode)
    raise ConfigError(
        f"model {model!r}: pooling={pooling!r} is not a pooling; use {' or '.join(POOLING)} "
        "(e.g. model.pooling=avg)"
    )


def scale_channels(channels: int, width: float) -> int:
    """Channels of a layer after applying the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def init_conv_bn_linear(model: nn.Module) -> None:
    """The usual initialization of BN networks (as in torchvision's VGG/ResNet/MobileNet).

    Kaiming (fan-out) convs, unit/zero batch norm, small normal linear layers: trains well
    from scratch, which matters because the zoo never loads pretrained weights.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
