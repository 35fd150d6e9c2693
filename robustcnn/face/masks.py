"""Where a physical patch may go: binary masks [1, 1, H, W] on the recognizer's face crop.

Why masks are built from the crop geometry and not drawn by hand: every face in the toolkit goes
through :func:`robustcnn.face.crops.crop_face`, whose detected face box is the central part of
the square crop (margin 1.0: the box is the central half). Eyes sit ~0.38 of the box height below its
top, the forehead at its top, so a mask defined in box units lands on the same facial feature on every
crop. Masks are float 0/1 tensors (so they multiply into composites without casts) and are validated
once here, so the engine can trust them.

* ``eyeglasses``: a frame silhouette (two thick rounded rims, a bridge, short temples) at eye level,
  like Sharif et al. 2016, whose printed frames cover ~6.5 % of their 224x224 aligned face. The default
  covers 5.96 % of the 150x150 crop (1,340 px; :func:`area_percent` reports the exact value).
* ``sticker``: an axis-aligned rectangle, centre and size as fractions of the crop (Brown et al.
  2017 style square patch, or a cheek/nose sticker).
* ``hat_band``: a forehead strip just above the eyebrows (AdvHat, Komkov & Petiushko 2019).
* ``from_png``: a user's mask image of exactly the crop size (grey > 0.5 or alpha > 0.5 is "patch").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any  # Any: make_mask's params, a config section's values

import torch
from torch import Tensor

from robustcnn.errors import ConfigError
from robustcnn.face.crops import CROP_SIZE, DEFAULT_MARGIN

#: Height of the eyes below the face box's top, as a fraction of the box side (see face_crops).
EYE_LEVEL = 0.38


def face_box(size: int = CROP_SIZE, margin: float = DEFAULT_MARGIN) -> tuple[float, float]:
    """(top-left coordinate, side) in pixels of the detected face box inside a ``size`` crop.

    The crop is square and centred on the box, ``side * (1 + margin)`` pixels wide before resizing.
    """
    if margin < 0:
        raise ConfigError(f"crop margin must be >= 0 (a multiple of the box side), got {margin}")
    side = size / (1.0 + margin)
    return (size - side) / 2.0, side


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (y, x), each [size, size], in pixels."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return y, x


def _as_mask(region: Tensor) -> Tensor:
    return region.to(torch.float32)[None, None]


def eyeglasses(
    size: int = CROP_SIZE,
    *,
    margin: float = DEFAULT_MARGIN,
    rim: float = 0.024,
    lens_width: float = 0.44,
    lens_height: float = 0.36,
    lens_spacing: float = 0.46,
    bridge: float = 0.03,
    temple_length: float = 0.05,
    eye_level: float = EYE_LEVEL,
) -> Tensor:
    """An eyeglass-frame silhouette at eye level: two elliptic rims, a bridge and two temples.

    All lengths are fractions of the face box side, so the frame scales with the crop: ``rim`` the
    rim thickness, ``lens_width``/``lens_height`` the outer size of one lens, ``lens_spacing`` the
    distance between the lens centres, ``bridge`` the bridge/temple thickness, ``temple_length`` how
    far the temples reach beyond the rims, ``eye_level`` the eyes' height below the box top (0.38 for
    Haar boxes; face-api's landmark-aligned boxes put them at ~0.30). The defaults give 6.22 % of a
    150 crop at the default tight margin (Sharif's ~6.5 %), centred on row ~55 (Haar eye level).
    """
    top, side = face_box(size, margin)
    y, x = _grid(size)
    cy = top + eye_level * side
    cx = size / 2.0
    a, b = lens_width * side / 2.0, lens_height * side / 2.0
    t = rim * side
    frame = torch.zeros(size, size, dtype=torch.bool)
    for sign in (-1.0, 1.0):
        lx = cx + sign * lens_spacing * side / 2.0
        outer = ((x - lx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
        ia, ib = max(a - t, 1e-3), max(b - t, 1e-3)
        inner = ((x - lx) / ia) ** 2 + ((y - cy) / ib) ** 2 < 1.0
        frame |= outer & ~inner
    thick = bridge * side
    # the bridge joins the rims slightly above the lens centres, like a real frame
    bridge_y = cy - 0.35 * b
    bridge_x = max(lens_spacing * side / 2.0 - a + t, t)  # to the inner edge of each rim, not across the lens
    frame |= ((y - bridge_y).abs() <= thick / 2.0) & ((x - cx).abs() <= bridge_x)
    # temples: from the outer edge of each rim towards the ears, at the rims' upper third
    outer_x = lens_spacing * side / 2.0 + a
    reach = outer_x + temple_length * side
    frame |= (
        ((y - bridge_y).abs() <= thick / 2.0) & ((x - cx).abs() >= outer_x - t) & ((x - cx).abs() <= reach)
    )
    return _as_mask(frame)


def sticker(
    size: int = CROP_SIZE,
    *,
    center: tuple[float, float] = (0.5, 0.62),
    extent: tuple[float, float] = (0.2, 0.2),
) -> Tensor:
    """A rectangle: ``center`` (x, y) and ``extent`` (width, height) as fractions of the crop side.

    The default (a 30x30 px square below the nose on a 150 crop, 4 % of it) is a Brown et al. style
    square patch placed on the face; move it with ``center`` (e.g. (0.38, 0.62): the left cheek).
    """
    cx, cy = (float(v) * size for v in center)
    w, h = (float(v) * size for v in extent)
    if w <= 0 or h <= 0:
        raise ConfigError(f"sticker extent {extent} must be positive fractions of the crop (e.g. (0.2, 0.2))")
    y, x = _grid(size)
    return _as_mask(((x - cx).abs() <= w / 2.0) & ((y - cy).abs() <= h / 2.0))


def hat_band(
    size: int = CROP_SIZE,
    *,
    margin: float = DEFAULT_MARGIN,
    top: float = 0.0,
    height: float = 0.1,
    width: float = 0.55,
) -> Tensor:
    """A forehead strip (AdvHat's sticker on the front of a cap), in face box units.

    ``top`` is the strip's upper edge below the box top (negative: above it), ``height`` its height and
    ``width`` its width (centred), as fractions of the box side. The default spans the forehead above
    the eyebrows at the default tight margin: y ~ [0, 15] and x ~ [34, 116] px on a 150 crop (5.5 %).
    """
    box_top, side = face_box(size, margin)
    if height <= 0 or width <= 0:
        raise ConfigError(
            f"hat_band height={height} and width={width} must be > 0 (fractions of the face box)"
        )
    y, x = _grid(size)
    y0 = box_top + top * side
    inside = (y >= y0) & (y <= y0 + height * side) & ((x - size / 2.0).abs() <= width * side / 2.0)
    return _as_mask(inside)


def from_png(path: str | Path, size: int = CROP_SIZE) -> Tensor:
    """A user's mask image: white (or opaque, for images with alpha) = patch pixels.

    The image must already have the crop's size: a silent resize would move the mask off the feature
    it was drawn for. Grey levels are thresholded at 0.5 (anti-aliased drawings become binary).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mask image {path} does not exist; give a PNG of {size}x{size} pixels")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                grey = image.convert("RGBA").getchannel("A")
            else:
                grey = image.convert("L")
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"mask image {path} cannot be read as an image: {exc}") from exc
    if grey.size != (size, size):
        raise ConfigError(
            f"mask image {path} is {grey.size[0]}x{grey.size[1]} but the face crop is {size}x{size}; "
            "draw the mask on a crop-sized canvas"
        )
    values = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(size, size)
    return check_mask(_as_mask(values.float() / 255.0 > 0.5), size, name=str(path))


#: The mask builders by name (``make_mask``); each takes the crop size first.
MASKS: dict[str, Callable[..., Tensor]] = {
    "eyeglasses": eyeglasses,
    "sticker": sticker,
    "hat_band": hat_band,
    "png": from_png,
}


def check_mask(mask: Tensor, size: int | tuple[int, int], name: str = "mask") -> Tensor:
    """Validate a mask for a crop of ``size``; returns it as float 0/1 [1, 1, H, W].

    Accepts [H, W], [1, H, W] or [1, 1, H, W], bool or float (non-binary floats are thresholded at
    0.5). Raises ConfigError for a size mismatch or an empty mask (an attack with no pixels to change).
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if not isinstance(mask, Tensor):
        raise ConfigError(f"{name} must be a tensor [1, 1, H, W], got {type(mask).__name__}")
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or m.shape[0] != 1 or m.shape[1] != 1:
        raise ConfigError(
            f"{name} has shape {tuple(mask.shape)}; masks are [1, 1, H, W] (one for all channels)"
        )
    if tuple(m.shape[-2:]) != hw:
        raise ConfigError(
            f"{name} is {m.shape[-2]}x{m.shape[-1]} but the face crop is {hw[0]}x{hw[1]}; "
            "build the mask for the crop size (make_mask(name, size=...))"
        )
    m = (m > 0.5) if m.dtype != torch.bool else m
    if not bool(m.any()):
        raise ConfigError(f"{name} is empty: it selects no pixel, so there is nothing to attack")
    return m.to(torch.float32)


def make_mask(name: str, size: int = CROP_SIZE, **params: Any) -> Tensor:
    """Build a mask by name (eyeglasses, sticker, hat_band, png with ``path=``) and validate it."""
    builder = MASKS.get(name)
    if builder is None:
        raise ConfigError(f"unknown patch mask {name!r}; valid masks: {sorted(MASKS)}")
    if name == "png":
        if "path" not in params:
            raise ConfigError("mask 'png' needs path=<file.png> (a crop-sized mask image)")
        extra = sorted(set(params) - {"path"})
        if extra:
            raise ConfigError(f"mask 'png' takes only path=..., not {extra}")
        return from_png(params["path"], size)
    try:
        mask = builder(size, **params)
    except TypeError as exc:
        raise ConfigError(f"mask {name!r}: {exc}") from exc
    return check_mask(mask, size, name=f"mask {name!r}")


def area_percent(mask: Tensor) -> float:
    """Share of the crop's pixels that the mask covers, in percent."""
    return float(mask.float().mean()) * 100.0
