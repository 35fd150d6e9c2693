"""``lenet5``: the small two-conv MNIST network of adversarial-training papers.

conv 32@3x3 -> pool -> conv 64@3x3 -> pool -> fc 200 -> dropout -> fc classes
(648,226 parameters on 1x28x28 with 10 classes). Small enough to adversarially train on a CPU.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustcnn.models.builders import require_input_size
from robustcnn.models.dropout import InferenceDropout
from robustcnn.models.registry import register_model


class LeNet5(nn.Module):
    """Two 3x3 conv/ReLU/max-pool stages, then two fully connected layers."""

    def __init__(
        self, in_channels: int, num_classes: int, input_size: tuple[int, int], dropout: float
    ) -> None:
        super().__init__()
        height, width = input_size
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 200)
        # Always present (identity at p=0) so the state_dict does not depend on the rate.
        self.dropout = InferenceDropout(dropout)
        self.fc2 = nn.Linear(200, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


@register_model("lenet5")
def lenet5(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int], dropout: float = 0.0
) -> nn.Module:
    """Build :class:`LeNet5` (no options)."""
    require_input_size("lenet5", input_size, 4, "two 2x2 max-pools need a 2x2 map left after the first")
    return LeNet5(in_channels, num_classes, input_size, dropout)
