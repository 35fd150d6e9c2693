"""The one model type the rest of robustcnn sees: raw images in, logits out.

Attacks perturb images inside the pixel ``bounds`` and measure epsilons in that space, so the
normalization must live *inside* the model: an attack that saw normalized tensors would clip to
the wrong box and report epsilons in the wrong units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustcnn.errors import ConfigError, ModelError
from robustcnn.models.dropout import has_active_inference_dropout


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate (channels, height, width) and return it as a tuple of ints."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(
            f"input_shape must be (channels, height, width) with positive integers, got "
            f"{input_shape!r}; pass e.g. (1, 28, 28) for MNIST or (3, 32, 32) for CIFAR-10"
        )
    return shape


def check_num_classes(num_classes: int) -> int:
    """Validate the number of classes (a classifier needs at least two)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes must be an integer >= 2, got {num_classes!r}; set it to the number of "
            "labels in the dataset"
        )
    return num_classes


def _channel_stats(label: str, values: Sequence[float], channels: int, *, positive: bool) -> Tensor:
    """Validate a per-channel mean/std and shape it [1, C, 1, 1] for broadcasting."""
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{label} must be a list of {channels} numbers (one per channel), got {values!r}; "
            f"pass the per-channel {label} of the training images"
        ) from exc
    if len(floats) != channels:
        raise ConfigError(
            f"{label} has {len(floats)} value(s) but the input has {channels} channel(s); "
            f"give exactly one {label} value per channel"
        )
    if not all(math.isfinite(v) for v in floats) or (positive and min(floats) <= 0):
        need = "finite and > 0" if positive else "finite"
        raise ConfigError(
            f"{label} values must be {need}, got {floats}; "
            f"pass the per-channel {label} of the training images"
        )
    return torch.tensor(floats, dtype=torch.float32).view(1, channels, 1, 1)


class Classifier(nn.Module):
    """Takes raw images in ``bounds`` ([0, 1] by default) and owns their normalization.

    ``forward`` computes ``net((x - mean) / std)``. ``mean``/``std`` are non-persistent buffers
    (they follow ``.to(device)`` but are not saved), so the state_dict holds only the network's
    weights under the prefix ``"net."`` and stays loadable whatever statistics a dataset uses.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        input_shape: tuple[int, int, int],
        num_classes: int,
        bounds: tuple[float, float] = (0.0, 1.0),
        name: str = "custom",
    ) -> None:
        super().__init__()
        input_shape = check_input_shape(input_shape)
        num_classes = check_num_classes(num_classes)
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            lo, hi = math.nan, math.nan
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(
                f"bounds must be (low, high) with low < high, got {bounds!r}; use (0.0, 1.0) for "
                "images scaled to [0, 1]"
            )
        channels = input_shape[0]
        self.net = net
        self.register_buffer("mean", _channel_stats("mean", mean, channels, positive=False), persistent=False)
        self.register_buffer("std", _channel_stats("std", std, channels, positive=True), persistent=False)
        self.input_shape: tuple[int, int, int] = input_shape
        self.num_classes = num_classes
        self.bounds: tuple[float, float] = (lo, hi)
        self.name = name
        #: With dropout kept on at inference, average the prediction over this many draws
        #: (the randomised-defense setting); 1 = a single draw.
        self.inference_samples = 1

    def forward(self, x: Tensor) -> Tensor:
        """Normalize raw images ``x`` [N, C, H, W] and return logits [N, num_classes]."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise ModelError(
                f"model {self.name!r} expects images shaped [N, {c}, {h}, {w}], got "
                f"{list(x.shape)}; add a batch dimension or resize the inputs, or build the model "
                "with the matching input_shape"
            )
        normalized = (x - self.mean) / self.std
        draws = self.inference_samples if not self.training and self.inference_samples > 1 else 1
        if draws > 1 and self.stochastic:
            # one batched pass over `draws` copies; log of the mean probability is a valid logit
            out = self.net(normalized.repeat(draws, 1, 1, 1))
            log_probs = out.log_softmax(1).view(draws, x.shape[0], -1)
            logits = torch.logsumexp(log_probs, 0) - math.log(draws)
        else:
            logits = self.net(normalized)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ModelError(
                f"network of model {self.name!r} returned shape {list(logits.shape)} instead of "
                f"[N, {self.num_classes}]; make its last layer output num_classes logits"
            )
        return logits

    @property
    def stochastic(self) -> bool:
        """True when some dropout (``InferenceDropout`` with p > 0) is kept active in eval mode.

        Attacks use it to decide whether gradients need averaging over random draws (EOT).
        """
        return has_active_inference_dropout(self)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"bounds={self.bounds}"
        )


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors once); all of them unless ``trainable_only``.

    Counting all parameters by default makes the number a property of the architecture, not of
    which layers a defense happens to freeze.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
