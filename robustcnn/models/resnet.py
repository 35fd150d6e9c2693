"""``resnet18``: CIFAR-style ResNet-18 (He et al., 2016, as adapted in the common CIFAR ports).

Differs from the ImageNet model only in the stem: one 3x3 stride-1 conv and no max-pool, so a
32x32 image keeps enough resolution for the four stages (32 -> 32 -> 16 -> 8 -> 4). 11.17M
parameters with 10 classes at ``width=1``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.models.builders import check_width, init_conv_bn_linear, require_input_size, scale_channels
from robustcnn.models.dropout import InferenceDropout
from robustcnn.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # Projection so the residual sum has matching shape (option B of the paper).
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem, four stages of BasicBlocks, global average pool, dropout, linear classifier."""

    def __init__(
        self, blocks: tuple[int, ...], in_channels: int, num_classes: int, dropout: float, width: float
    ) -> None:
        super().__init__()
        channels = scale_channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        stages: list[nn.Module] = []
        for i, n_blocks in enumerate(blocks):
            out = scale_channels(64 * 2**i, width)
            stride = 1 if i == 0 else 2
            layers = [
                BasicBlock(channels if j == 0 else out, out, stride if j == 0 else 1) for j in range(n_blocks)
            ]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Always present (identity at p=0) so the state_dict does not depend on the rate.
        self.dropout = InferenceDropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(self.dropout(x))


@register_model("resnet18")
def resnet18(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    dropout: float = 0.0,
    width: float = 1.0,
) -> nn.Module:
    """Build ResNet-18 (BasicBlocks [2, 2, 2, 2]); ``width`` scales the 64..512 channels."""
    width = check_width("resnet18", width)
    require_input_size("resnet18", input_size, 5, "the last of three stride-2 stages needs a 2x2 map")
    return ResNet((2, 2, 2, 2), in_channels, num_classes, dropout, width)
