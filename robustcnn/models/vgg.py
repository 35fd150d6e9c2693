"""``vgg11_small``: CIFAR-style VGG-11 with batch norm.

The ImageNet classifier head (three 4096-wide layers on a 7x7 map) is replaced by global
average pooling and one linear layer, as in the common CIFAR ports. The 2x2 pools (max as
published, or average with ``pooling=avg``) use ``ceil_mode=True``: on 32x32 inputs this changes
nothing (all maps have even sides), and it lets 28x28 MNIST images go through the five pools
(28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of collapsing to an empty map; an average over a window
that overhangs the map divides by the pixels it covers.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustcnn.models.builders import (
    check_width,
    init_conv_bn_linear,
    pooling_layer,
    require_input_size,
    scale_channels,
)
from robustcnn.models.dropout import InferenceDropout
from robustcnn.models.registry import register_model

# Output channels of each 3x3 conv; "M" is a 2x2 pool (max, or average with pooling=avg).
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """conv3x3-BN-ReLU feature stack, global average pool, dropout, linear classifier."""

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        in_channels: int,
        num_classes: int,
        dropout: float,
        width: float,
        pooling: str = "max",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(pooling_layer("vgg11_small", pooling, ceil_mode=True))
            else:
                out = scale_channels(int(item), width)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Always present (identity at p=0) so the state_dict does not depend on the rate.
        self.dropout = InferenceDropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register_model("vgg11_small")
def vgg11_small(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    dropout: float = 0.0,
    width: float = 1.0,
    pooling: str = "max",
) -> nn.Module:
    """Build VGG-11-BN; ``width`` scales every conv's channels (0.25: a 4x thinner net); ``pooling``:
    ``max`` (the published network) or ``avg`` for its five down-sampling pools."""
    width = check_width("vgg11_small", width)
    require_input_size("vgg11_small", input_size, 17, "the fifth 2x2 max-pool needs a 2x2 map")
    return VGG(VGG11_CFG, in_channels, num_classes, dropout, width, pooling)
