"""``lenet5``: the small two-conv MNIST network of adversarial-training papers.

conv 32@3x3 -> pool -> conv 64@3x3 -> pool -> fc 200 -> dropout -> fc classes
(648,226 parameters on 1x28x28 with 10 classes). Small enough to adversarially train on a CPU.
The pools are 2x2 max-pools as published, or average pools with ``pooling=avg``.
"""

from __future__ import annotations

from torch import nn

from robustcnn.models.builders import require_input_size
from robustcnn.models.registry import register_model
from robustcnn.models.two_conv import TwoConvNet


@register_model("lenet5")
def lenet5(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    dropout: float = 0.0,
    pooling: str = "max",
) -> nn.Module:
    """Build lenet5 (3x3 kernels, fc 200); ``pooling``: ``max`` (the published network) or ``avg``."""
    require_input_size("lenet5", input_size, 4, "two 2x2 pools need a 2x2 map left after the first")
    shape = (in_channels, *input_size, num_classes)
    return TwoConvNet("lenet5", shape, kernel=3, hidden=200, dropout=dropout, pooling=pooling)
