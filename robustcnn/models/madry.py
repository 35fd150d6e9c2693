"""``madry_cnn``: the MNIST network of Madry et al. (2018), "Towards Deep Learning Models
Resistant to Adversarial Attacks".

conv 32@5x5 -> pool -> conv 64@5x5 -> pool -> fc 1024 -> dropout -> fc classes (3.27M
parameters on 28x28): the reference architecture for MNIST PGD adversarial training. The pools
are 2x2 max-pools as published, or average pools with ``pooling=avg``.
"""

from __future__ import annotations

from torch import nn

from robustcnn.models.builders import require_input_size
from robustcnn.models.registry import register_model
from robustcnn.models.two_conv import TwoConvNet


@register_model("madry_cnn")
def madry_cnn(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    dropout: float = 0.0,
    pooling: str = "max",
) -> nn.Module:
    """Build madry_cnn (5x5 kernels, fc 1024); ``pooling``: ``max`` (the published network) or ``avg``."""
    require_input_size("madry_cnn", input_size, 4, "two 2x2 pools need a 2x2 map left after the first")
    shape = (in_channels, *input_size, num_classes)
    return TwoConvNet("madry_cnn", shape, kernel=5, hidden=1024, dropout=dropout, pooling=pooling)
