"""The two-conv MNIST networks of adversarial-training papers (lenet5, madry_cnn) share one shape.

conv -> ReLU -> 2x2 pool -> conv -> ReLU -> 2x2 pool -> fc -> ReLU -> dropout -> fc classes; they
differ only in the kernel size and the hidden layer's width, so one class builds both and the
options (dropout, pooling) mean the same thing in each.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustcnn.models.builders import pooling_layer
from robustcnn.models.dropout import InferenceDropout


class TwoConvNet(nn.Module):
    """conv ``kernel`` 32 -> pool -> conv ``kernel`` 64 -> pool -> fc ``hidden`` -> dropout -> fc."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, int, int, int],
        *,
        kernel: int,
        hidden: int,
        dropout: float,
        pooling: str,
    ) -> None:
        """``shape``: (in_channels, height, width, num_classes); ``name`` is the model's, for errors."""
        super().__init__()
        in_channels, height, width, num_classes = shape
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=kernel, padding=kernel // 2)
        self.pool = pooling_layer(name, pooling)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), hidden)
        # Always present (identity at p=0) so the state_dict does not depend on the rate.
        self.dropout = InferenceDropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))
