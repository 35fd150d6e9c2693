"""face-api's face recognizer (a ResNet-34-like net from dlib, via TF.js) re-implemented in torch.

Why a port rather than a bundled model: the attacks need gradients of a *real* pretrained face
embedder, and face-api 1.7.15 (MIT, on the npm registry) ships one with published weights. The layer
order, paddings and the odd zero-padding of the residual shortcuts follow the package's source
(src/faceRecognitionNet/*.ts) exactly, so the converted weights give the same descriptors as the
original (tests/test_face_model.py checks this against descriptors computed by the JS code itself).

Layout of the state dict mirrors the TF.js manifest: ``conv32_1/conv1/conv/filters`` becomes
``conv32_1.conv1.conv.weight`` (HWIO -> OIHW), ``.../scale/weights`` -> ``...scale.weight``, and so on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Side of the square RGB crop the net was trained on.
INPUT_SIZE = 150
#: face-api's per-channel RGB mean (on the 0-255 scale); inputs are (x - mean) / 255.
MEAN_RGB = (122.782, 117.001, 104.298)
#: Length of a descriptor.
DESCRIPTOR_SIZE = 128
#: File name of the converted weights inside the assets folder (robustcnn.models.face.assets).
WEIGHTS_FILE = "face_recognition.safetensors"


class ScaleLayer(nn.Module):
    """Per-channel ``x * weight + bias`` (dlib's folded batch norm, kept apart to mirror the weights)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ConvLayer(nn.Module):
    """conv + bias, scale, optional ReLU. Stride 1 is TF 'same' (pad 1 for 3x3); stride 2 is 'valid'."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        padding = kernel // 2 if stride == 1 else 0
        # nn.Module / None: robustcnn.models.face.fused swaps in a faster conv and folds the scale away
        self.conv: nn.Module = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=True)
        self.scale: ScaleLayer | None = ScaleLayer(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.scale is not None:
            out = self.scale(out)
        return F.relu(out, inplace=True) if self.relu else out  # a fresh tensor: in place saves a copy


class ResidualBlock(nn.Module):
    """Two 3x3 convs plus shortcut; a down block halves the size with a 'valid' stride-2 conv.

    The down block's shortcut is a 2x2/2 average pool with zero channels appended; when the pooled
    map is larger than the conv path (odd sizes), face-api appends zero rows at the bottom and zero
    columns at the right of the conv path (residualLayer.ts), which we reproduce.
    """

    def __init__(self, cin: int, cout: int, down: bool = False) -> None:
        super().__init__()
        self.down = down
        self.conv1 = ConvLayer(cin, cout, stride=2 if down else 1, relu=True)
        self.conv2 = ConvLayer(cout, cout, stride=1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if not self.down:
            return F.relu(out + x, inplace=True)
        pooled = F.avg_pool2d(x, 2, 2)
        extra = out.shape[1] - pooled.shape[1]
        if extra > 0:
            pooled = F.pad(pooled, (0, 0, 0, 0, 0, extra))
        dh, dw = pooled.shape[2] - out.shape[2], pooled.shape[3] - out.shape[3]
        if dh or dw:
            out = F.pad(out, (0, max(dw, 0), 0, max(dh, 0)))
        return F.relu(out + pooled, inplace=True)


#: (name, in channels, out channels, down) of every residual block, in forward order.
BLOCKS: tuple[tuple[str, int, int, bool], ...] = (
    ("conv32_1", 32, 32, False),
    ("conv32_2", 32, 32, False),
    ("conv32_3", 32, 32, False),
    ("conv64_down", 32, 64, True),
    ("conv64_1", 64, 64, False),
    ("conv64_2", 64, 64, False),
    ("conv64_3", 64, 64, False),
    ("conv128_down", 64, 128, True),
    ("conv128_1", 128, 128, False),
    ("conv128_2", 128, 128, False),
    ("conv256_down", 128, 256, True),
    ("conv256_1", 256, 256, False),
    ("conv256_2", 256, 256, False),
    ("conv256_down_out", 256, 256, True),
)


def _lerp_indices(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """TF.js resizeBilinear sampling (alignCorners=false, halfPixelCenters=false): src = dst * in / out."""
    src = torch.arange(out_size, device=device, dtype=torch.float64) * (in_size / out_size)
    low = src.floor().clamp(max=in_size - 1)
    high = src.ceil().clamp(max=in_size - 1)
    frac = (src - low).to(torch.float32)
    return low.long(), high.long(), frac


def resize_bilinear_tf(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [N, C, H, W] to size x size the way TF.js does (legacy corner-aligned sampling, no antialias).

    Why not F.interpolate: torch samples at half-pixel centres, TF.js's default does not, and face-api
    calls the TF.js default; the difference is up to half a pixel of shift. Differentiable in ``x``.
    """
    top, bottom, fy = _lerp_indices(x.shape[2], size, x.device)
    left, right, fx = _lerp_indices(x.shape[3], size, x.device)
    fy, fx = fy.to(x.dtype).view(1, 1, -1, 1), fx.to(x.dtype).view(1, 1, 1, -1)
    rows = x[:, :, top] + (x[:, :, bottom] - x[:, :, top]) * fy
    return rows[..., left] + (rows[..., right] - rows[..., left]) * fx


def pad_to_square(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad [N, C, H, W] to a square, centred as face-api's padToSquare(isCenterImage=true) does.

    face-api puts round(diff / 2) zero rows (or columns) after the image and the rest before it.
    """
    h, w = x.shape[2], x.shape[3]
    if h == w:
        return x
    diff = abs(h - w)
    after = int(diff * 0.5 + 0.5)  # JS Math.round (halves round up), not Python's banker's rounding
    before = diff - after
    if h > w:
        return F.pad(x, (before, after, 0, 0))
    return F.pad(x, (0, 0, before, after))


def to_face_input(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3, size, size]: zero-pad to a centred square, resize bilinearly.

    This is what face-api does to a non-square or differently sized input before its net, so callers with
    other crops get the descriptors the original would give them.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"face crops must be [N, 3, H, W] RGB, got shape {tuple(x.shape)}")
    x = pad_to_square(x)
    if x.shape[2] != size:
        x = resize_bilinear_tf(x, size)
    return x


class FaceApiResNet(nn.Module):
    """face-api's recognizer: [N, 3, 150, 150] RGB in [0, 1] -> [N, 128] descriptors (not unit-norm).

    The model owns its normalisation (robustcnn's convention): x * 255 - mean, then / 255. Inputs of
    another size are padded and resized as face-api does (:func:`to_face_input`). Two faces are the same
    person when the Euclidean distance of their descriptors is below ~0.6.
    """

    mean: torch.Tensor  # a buffer (registered in __init__); declared, else it types as Tensor | Module

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.conv32_down = ConvLayer(3, 32, kernel=7, stride=2, relu=True)
        for name, cin, cout, down in BLOCKS:
            self.add_module(name, ResidualBlock(cin, cout, down))
        self.fc = nn.Linear(256, DESCRIPTOR_SIZE, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = to_face_input(x)
        out = self.conv32_down(x - self.mean)
        out = F.max_pool2d(out, 3, 2)
        for name, *_ in BLOCKS:
            out = getattr(self, name)(out)
        return self.fc(out.mean(dim=(2, 3)))


