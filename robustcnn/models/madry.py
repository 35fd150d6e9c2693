"""``madry_cnn``: the MNIST network of Madry et al. (2018), "Towards Deep Learning Models
Resistant to Adversarial Attacks".

conv 32@5x5 -> pool -> conv 64@5x5 -> pool -> fc 1024 -> dropout -> fc classes (3.27M
parameters on 28x28): the reference architecture for MNIST PGD adversarial training.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustcnn.models.builders import require_input_size
from robustcnn.models.dropout import InferenceDropout
from robustcnn.models.registry import register_model


class MadryCNN(nn.Module):
    """Two 5x5 conv/ReLU/max-pool stages, then fc 1024 and the output layer."""

    def __init__(
        self, in_channels: int, num_classes: int, input_size: tuple[int, int], dropout: float
    ) -> None:
        super().__init__()
        height, width = input_size
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 1024)
        # Always present (identity at p=0) so the state_dict does not depend on the rate.
        self.dropout = InferenceDropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


@register_model("madry_cnn")
def madry_cnn(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int], dropout: float = 0.0
) -> nn.Module:
    """Build :class:`MadryCNN` (no options)."""
    require_input_size("madry_cnn", input_size, 4, "two 2x2 max-pools need a 2x2 map left after the first")
    return MadryCNN(in_channels, num_classes, input_size, dropout)
