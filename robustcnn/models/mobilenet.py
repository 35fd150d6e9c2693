"""``mobilenet_v2``: MobileNetV2 (Sandler et al., 2018) adapted to 28-32 pixel inputs.

As in the common CIFAR ports, the stem conv and the first two rows of the inverted-residual
setting use stride 1 (the ImageNet model down-samples 32x, which would leave a 32x32 image as a
1x1 map after the second stage); the remaining three stride-2 rows take 32x32 to 4x4. The layer
layout otherwise follows torchvision (2.24M parameters with 10 classes at ``width=1``).
"""

from __future__ import annotations

from torch import Tensor, nn

from robustcnn.models.builders import check_width, init_conv_bn_linear, require_input_size
from robustcnn.models.dropout import InferenceDropout
from robustcnn.models.registry import register_model

# (expansion t, output channels c, repeats n, stride s of the first repeat); rows 1-2 have s=1
# here (the ImageNet setting has s=2 on row 2, plus a stride-2 stem).
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping >10% (MobileNet convention)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU6(nn.Sequential):
    """Conv (same padding) -> BatchNorm -> ReLU6."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ):
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem, inverted-residual stages, 1x1 conv to 1280, global pool, dropout, linear."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float, width: float) -> None:
        super().__init__()
        channels = make_divisible(32 * width)
        # As in torchvision, the last conv never shrinks below 1280 (it only grows for width > 1).
        last_channels = make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, channels, stride=1)]
        for t, c, n, s in CIFAR_SETTING:
            out = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(ConvBNReLU6(channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Always present (identity at p=0) so the state_dict does not depend on the rate.
        self.dropout = InferenceDropout(dropout)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register_model("mobilenet_v2")
def mobilenet_v2(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    dropout: float = 0.0,
    width: float = 1.0,
) -> nn.Module:
    """Build the small-input MobileNetV2; ``width`` is the usual channel multiplier."""
    width = check_width("mobilenet_v2", width)
    require_input_size("mobilenet_v2", input_size, 5, "the last of three stride-2 stages needs a 2x2 map")
    return MobileNetV2(in_channels, num_classes, dropout, width)
