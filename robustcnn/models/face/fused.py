"""face-api's recognizer rearranged for speed: the same function in fewer, cheaper operations.

Why: on CPU a face patch step is mostly the recognizer's forward pass and its gradient w.r.t. the
input, and a third of that gradient was the backward of the first convolution (7x7, stride 2, 3 input
channels), a shape oneDNN handles ~2.5x slower than the equivalent stride-1 convolution on a
space-to-depth input. Two exact rewrites (equal up to float rounding; tests/test_face_model.py checks
descriptors and input gradients against the reference port):

1. every ScaleLayer folded into the convolution before it (conv, then a per-channel affine map, is
   one convolution with scaled filters and bias);
2. the first convolution as space-to-depth (2x2 blocks to channels) and a stride-1 4x4 convolution
   on 12 channels (the 7x7 kernel zero-padded to 8x8 and split into its 2x2 phases; its input is
   always 150x150);

and channels-last memory format for the filters and activations, which oneDNN's convolutions and
max pooling run faster on CPU. The reference port (:mod:`robustcnn.models.face.network`) stays as it
is: it mirrors the TF.js weights file, and the converter and the JS-equivalence test use it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from robustcnn.errors import ModelError
from robustcnn.models.face.network import ConvLayer, FaceApiResNet

#: The space-to-depth block size: the first convolution's stride.
_BLOCK = 2


class SpaceToDepthConv(nn.Module):
    """A stride-2 'valid' convolution computed as space-to-depth (each 2x2 block of pixels becomes
    4x the channels) + a stride-1 convolution.

    Output [n, o, h, w] equals ``F.conv2d(x, weight, bias, stride=2)`` for even input sides.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.stride != (_BLOCK, _BLOCK) or conv.padding != (0, 0) or conv.bias is None:
            raise ModelError("SpaceToDepthConv rewrites a stride-2 convolution without padding, with bias")
        out, cin, kh, kw = conv.weight.shape
        side = _BLOCK * ((max(kh, kw) + _BLOCK - 1) // _BLOCK)
        padded = F.pad(conv.weight.detach(), (0, side - kw, 0, side - kh))
        # w[o, c, 2i + a, 2j + b] -> w[o, (2a + b) * cin + c, i, j]: the channel order forward() makes
        half = side // _BLOCK
        phases = padded.reshape(out, cin, half, _BLOCK, half, _BLOCK).permute(0, 3, 5, 1, 2, 4)
        phases = phases.reshape(out, _BLOCK * _BLOCK * cin, half, half)
        self.weight = nn.Parameter(phases.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # space-to-depth into channels-last memory [n, h/2, w/2, (a, b, c)] in two copies whose inner
        # runs are contiguous (NCHW -> NHWC, then whole (b, c) runs): each way ~2x faster than
        # F.pixel_unshuffle + channels-last, or one 6-d permute with 2- and 3-long inner dims
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).contiguous().view(n, h // _BLOCK, _BLOCK, w // _BLOCK, _BLOCK * c)
        blocks = rows.permute(0, 1, 3, 2, 4).reshape(n, h // _BLOCK, w // _BLOCK, _BLOCK * _BLOCK * c)
        return F.conv2d(blocks.permute(0, 3, 1, 2), self.weight, self.bias)


def _fold_scale(layer: ConvLayer) -> None:
    """conv(x) * s + t as one convolution: filters times s, bias times s plus t."""
    conv, scale = layer.conv, layer.scale
    if scale is None or not isinstance(conv, nn.Conv2d) or conv.bias is None:
        return
    s = scale.weight.detach()
    conv.weight.copy_(conv.weight * s.view(-1, 1, 1, 1))
    conv.bias.copy_(conv.bias * s + scale.bias.detach())
    layer.scale = None


@torch.no_grad()
def fuse_face_api(model: FaceApiResNet) -> FaceApiResNet:
    """A frozen, eval-mode copy of ``model`` computing the same descriptors faster (see the module notes).

    The copy's state dict no longer has the TF.js layout; keep ``model`` for saving or converting.
    """
    fused = copy.deepcopy(model).eval()
    for layer in fused.modules():
        if isinstance(layer, ConvLayer):
            _fold_scale(layer)
    stem = fused.conv32_down.conv
    if isinstance(stem, nn.Conv2d):
        fused.conv32_down.conv = SpaceToDepthConv(stem)
    for p in fused.parameters():
        if p.dim() == 4:  # filters in channels-last memory (Module.to(memory_format=...) is untyped)
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        p.requires_grad_(False)
    return fused
