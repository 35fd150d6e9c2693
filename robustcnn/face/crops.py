"""One rule for turning a detected face box into the recognizer's square 150x150 crop.

Why one module: the embedded gallery, a user's identity folders, the port's parity fixture and the
patch masks must all see the same geometry. The crop is square, centred on the box, with a margin of
``margin`` x the box side split evenly around it (margin 0: the crop is the box; margin 1.0: the box is
the central half of the crop). The default is the tight crop: on the embedded gallery it separates
identities best (impostor distances: median 0.645 at margin 0 vs 0.499 at margin 1.0; the threshold at
1% false accepts rises from 0.32 to 0.46), as face-api's own pipeline feeds it tight aligned boxes.
Parts of the crop outside the photo are zero (black), as face-api pads non-square inputs; the square
is then resized bilinearly to ``size``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from robustcnn.errors import DataError

#: Side of the face recognizer's input crop (face-api's ResNet-34-like net: 150x150 RGB).
CROP_SIZE = 150
#: Default margin around a detected box, as a multiple of the box side: 0, the crop is the box.
DEFAULT_MARGIN = 0.0

Box = tuple[int, int, int, int]


def as_box(values: Iterable[float]) -> Box:
    """(x, y, w, h) in whole pixels from four numbers (a boxes file's list, a detector's floats)."""
    x, y, w, h = (int(v) for v in values)
    return x, y, w, h


def crop_face(
    image: np.ndarray, box: Box, margin: float = DEFAULT_MARGIN, size: int = CROP_SIZE
) -> np.ndarray:
    """Cut the square crop around ``box`` = (x, y, w, h) from an RGB uint8 ``image`` [H, W, 3].

    Returns uint8 [size, size, 3]. Deterministic (the parity fixture stores hashes of these bytes).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"crop_face needs an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    x, y, w, h = (int(v) for v in box)
    if w <= 0 or h <= 0:
        raise DataError(f"face box {box} has no area: boxes are (x, y, width, height) in pixels")
    if margin < 0:
        raise DataError(f"crop margin must be >= 0 (a multiple of the box side), got {margin}")
    side = int(round(max(w, h) * (1.0 + margin)))
    cx, cy = x + w / 2.0, y + h / 2.0
    left, top = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    square = np.zeros((side, side, 3), dtype=np.uint8)
    src_x0, src_y0 = max(left, 0), max(top, 0)
    src_x1, src_y1 = min(left + side, image.shape[1]), min(top + side, image.shape[0])
    if src_x1 <= src_x0 or src_y1 <= src_y0:
        raise DataError(f"face box {box} lies outside the {image.shape[1]}x{image.shape[0]} photo")
    square[src_y0 - top : src_y1 - top, src_x0 - left : src_x1 - left] = image[src_y0:src_y1, src_x0:src_x1]
    tensor = torch.from_numpy(square).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def to_unit_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 crops [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1] (exactly q / 255)."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(255.0)
