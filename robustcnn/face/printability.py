"""Smoothness and printability penalties of a patch: TV and NPS (Sharif et al. 2016; Thys et al. 2019).

Why: a printer reproduces neither high-frequency noise (the camera blurs it away, so TV keeps the
patch smooth) nor saturated colours outside its gamut (NPS pulls every patch pixel towards a colour
the printer can actually produce). Both are computed over the mask's pixels only and normalised per
mask pixel, so their weights do not depend on the patch size.

Where printable palettes come from: print a chart of many colours, photograph it under the lighting
of the attack, and keep the colours the camera sees (Sharif et al.'s ``printed-palette.png``). The
default palette below is NOT such a measurement: it is the 3x3x3 RGB cube plus three greys/skin
tones pushed through this toolkit's default print-and-capture model (:class:`PrintModel` in
``patch_transforms``: 80 % saturation, 85 % contrast, black lifted to 0.06), i.e. the colours a
washed-out office print can reach. Replace it with a photographed palette via :func:`load_palette`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from robustcnn.errors import ConfigError

#: 30 printable RGB colours in [0, 1] (see the module docstring for where they come from).
DEFAULT_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.06, 0.06, 0.06), (0.07, 0.07, 0.41), (0.079, 0.079, 0.759), (0.11, 0.45, 0.11),
    (0.12, 0.46, 0.46), (0.129, 0.469, 0.809), (0.16, 0.84, 0.16), (0.169, 0.849, 0.509),
    (0.179, 0.859, 0.859), (0.425, 0.085, 0.085), (0.435, 0.095, 0.435), (0.445, 0.105, 0.785),
    (0.475, 0.475, 0.135), (0.485, 0.485, 0.485), (0.495, 0.495, 0.835), (0.525, 0.865, 0.185),
    (0.535, 0.875, 0.535), (0.545, 0.885, 0.885), (0.791, 0.111, 0.111), (0.801, 0.121, 0.461),
    (0.81, 0.13, 0.81), (0.841, 0.501, 0.161), (0.85, 0.51, 0.51), (0.86, 0.52, 0.86),
    (0.891, 0.891, 0.211), (0.9, 0.9, 0.56), (0.91, 0.91, 0.91), (0.272, 0.272, 0.272),
    (0.698, 0.698, 0.698), (0.714, 0.578, 0.51),
)  # fmt: skip

#: NPS variants: Sharif's product over palette colours, Thys et al.'s distance to the nearest colour.
NPS_VARIANTS = ("product", "min")

_SQRT3 = 3.0**0.5


@functools.lru_cache(maxsize=8)
def _default_palette(device: str) -> Tensor:
    """The default palette on ``device``, built once: a host-to-device copy every step makes the host
    wait for the device (callers never modify it)."""
    return torch.tensor(DEFAULT_PALETTE, dtype=torch.float32).to(device)


def palette_tensor(palette: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
    """The palette as float [C, 3] on ``device`` (the default palette when ``palette`` is None)."""
    colours = _default_palette(str(device or "cpu")) if palette is None else palette.float()
    if colours.dim() != 2 or colours.shape[1] != 3 or colours.shape[0] < 1:
        raise ConfigError(f"a printable palette is [colours, 3] RGB in [0, 1], got {tuple(colours.shape)}")
    return colours.to(device) if device is not None else colours


def load_palette(path: str | Path) -> Tensor:
    """A palette from JSON: a list of [r, g, b] in [0, 1] or in 0..255 (any value > 1 means 0..255)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        colours = torch.tensor(data, dtype=torch.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"palette {path} is not a JSON list of [r, g, b] colours: {exc}") from exc
    if colours.numel() and float(colours.max()) > 1.0:
        colours = colours / 255.0
    if colours.numel() and (float(colours.min()) < 0.0 or float(colours.max()) > 1.0):
        raise ConfigError(f"palette {path} has colours outside [0, 1] (or 0..255)")
    return palette_tensor(colours)


@dataclass(frozen=True)
class MaskRegion:
    """Where a mask's pixels are: its bounding box, the box's mask [h, w] and the flat indices of its
    non-zero pixels inside the box.

    Why a value of its own: finding them reads the mask back to the host (``nonzero``, the box's
    ends); a patch optimisation computes it once (:meth:`of`) instead of twice a step.
    """

    box: tuple[int, int, int, int]  # rows r0:r1, columns c0:c1
    mask: Tensor
    keep: Tensor

    @classmethod
    def of(cls, mask: Tensor) -> MaskRegion:
        m = mask.detach().reshape(mask.shape[-2:]).float()
        rows, cols = m.sum(1).nonzero(), m.sum(0).nonzero()
        if rows.numel() == 0:
            return cls((0, 0, 0, 0), m[:0, :0], torch.zeros(0, dtype=torch.long, device=m.device))
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        box = m[r0:r1, c0:c1]
        return cls((r0, r1, c0, c1), box, box.reshape(-1).nonzero().flatten())


def _crop(patch: Tensor, region: MaskRegion) -> Tensor:
    """Patch [3, h, w] cut to the mask's bounding box (a frame is ~6 % of the crop: the penalties
    then cost a fraction of a full-image pass)."""
    r0, r1, c0, c1 = region.box
    return patch.reshape(-1, *patch.shape[-3:])[0][:, r0:r1, c0:c1]


def _pixels(patch: Tensor, region: MaskRegion) -> tuple[Tensor, Tensor]:
    """Colours [P, 3] and mask weights [P] of the P pixels where the mask is non-zero."""
    p, m = _crop(patch, region), region.mask.to(patch.dtype)
    flat = p.permute(1, 2, 0).reshape(-1, 3)
    return flat.index_select(0, region.keep), m.reshape(-1).index_select(0, region.keep)


def non_printability_score(
    patch: Tensor,
    mask: Tensor,
    palette: Tensor | None = None,
    variant: str = "product",
    eps: float = 1e-6,
    region: MaskRegion | None = None,
) -> Tensor:
    """NPS in [0, 1]: 0 when every mask pixel is a palette colour; a differentiable scalar.

    ``product`` (Sharif et al.): per pixel the product over palette colours of the distance, taken as
    the geometric mean of the distances normalised by sqrt(3). With 30 colours the raw product
    underflows float32 (0.2**30 ~ 1e-21) and its gradient vanishes; the geometric mean is a monotone
    function of it per pixel, with the same zeros. ``min`` (Thys et al.): the distance to the nearest
    palette colour, normalised by sqrt(3). Both are averaged over the mask's pixels.
    """
    if variant not in NPS_VARIANTS:
        raise ConfigError(f"unknown NPS variant {variant!r}; valid: {list(NPS_VARIANTS)}")
    pixels, weights = _pixels(patch, region or MaskRegion.of(mask))
    colours = palette_tensor(palette, pixels.device).to(pixels.dtype)
    # sqrt(d^2 + eps) - sqrt(eps): exactly 0 on a palette colour, smooth (no NaN gradient) there too
    d2 = (pixels[:, None, :] - colours[None, :, :]).pow(2).sum(-1)
    d = ((d2 + eps).sqrt() - d2.new_tensor(eps).sqrt()) / _SQRT3
    per_pixel = d.clamp_min(1e-12).log().mean(1).exp() if variant == "product" else d.min(1).values
    if variant == "product":
        per_pixel = torch.where(d.min(1).values <= 1e-12, torch.zeros_like(per_pixel), per_pixel)
    return (per_pixel * weights).sum() / weights.sum().clamp_min(1.0)


def total_variation(
    patch: Tensor, mask: Tensor, eps: float = 1e-8, region: MaskRegion | None = None
) -> Tensor:
    """Sharif's TV, sum of sqrt(dx^2 + dy^2) over neighbouring pixels inside the mask, per mask pixel.

    Differences are summed over the colour channels before the square root, and only taken between
    two mask pixels (the mask's border against the face is not the patch's own texture). A constant
    patch has TV exactly 0 (the smoothing ``eps`` is subtracted back out).
    """
    region = region or MaskRegion.of(mask)
    p, m = _crop(patch, region), region.mask.to(patch.dtype)
    # one empty row/column around the box so every mask pixel has its right and lower neighbours
    p, m = F.pad(p, (0, 1, 0, 1)), F.pad(m, (0, 1, 0, 1))
    dx = (p[:, :-1, 1:] - p[:, :-1, :-1]).pow(2).sum(0) * (m[:-1, 1:] * m[:-1, :-1])
    dy = (p[:, 1:, :-1] - p[:, :-1, :-1]).pow(2).sum(0) * (m[1:, :-1] * m[:-1, :-1])
    tv = (dx + dy + eps).sqrt() - dx.new_tensor(eps).sqrt()
    return (tv * m[:-1, :-1]).sum() / m.sum().clamp_min(1.0)
