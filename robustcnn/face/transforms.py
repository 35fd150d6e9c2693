"""EOT over physical variation (Athalye et al. 2018): what happens to a printed patch on a real face.

Why: a patch optimised for one exact digital composite fails once it is printed, worn a few pixels
off, seen under other light and through another crop of the detector. Expectation over
Transformation optimises the average loss over random draws of these effects, and an honest
evaluation measures success on *other* draws (held-out generators, :func:`draw_generator`).

One draw applies, in the order the physical world does:

1. the print-and-capture colour model (a fixed affine colour map that desaturates, lowers contrast
   and lifts the blacks, :class:`PrintModel`) on the patch only;
2. a small rotation / scale / translation of the patch relative to the face (glasses sit a little
   differently every time); patch and mask are warped together with ``grid_sample``, premultiplied,
   so colours from outside the mask never leak in;
3. the composite ``face * (1 - m) + patch * m``;
4. a global jitter of face + patch (translation up to ~10 px, small scale / rotation): the detector's
   crop is never the same twice, and this alone moves face-api descriptors by ~0.5;
5. brightness, contrast and a per-channel colour shift (lighting, white balance);
6. a Gaussian blur (focus, motion) and 7. sensor noise; then clamp to [0, 1].

Everything is torch on the faces' device and batched over draws; a stage whose range is zero is
skipped, so :meth:`PhysicalVariation.identity` is an exact digital composite.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any  # Any: from_dict's config section, to_dict's JSON

import torch
import torch.nn.functional as F
from torch import Tensor

from robustcnn.errors import ConfigError

#: Offsets that make optimisation and evaluation generators differ for every pair of seeds.
PURPOSES = {"optimise": 0, "evaluate": 1}

_LUMA = (0.299, 0.587, 0.114)


def draw_generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for ``purpose`` ("optimise" or "evaluate"): seeded ``2 * seed + offset``.

    The two purposes never share a seed, so held-out evaluation draws are never the draws a patch
    was optimised on, whatever seeds a user picks.
    """
    if purpose not in PURPOSES:
        raise ConfigError(f"unknown draw purpose {purpose!r}; valid: {sorted(PURPOSES)}")
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((2 * int(seed) + PURPOSES[purpose]) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def image_size(images: Tensor) -> tuple[int, int]:
    """(H, W) of an image batch [..., H, W]: the crop size that draws and masks are made for."""
    return int(images.shape[-2]), int(images.shape[-1])


@dataclass(frozen=True)
class PrintModel:
    """Print-and-capture colour map ``p -> A p + b`` of the patch, clamped to [0, 1].

    The default is a washed-out office print photographed indoors: saturation 0.8 (mixed toward
    luma), contrast 0.85, blacks lifted to 0.06, so the brightest printable white is 0.91. ``matrix``
    (3x3, rows = output channels) and ``bias`` (3) override it with a measured map (fit one by
    photographing a printed colour chart and regressing captured on printed colours).
    """

    saturation: float = 0.8
    contrast: float = 0.85
    black: float = 0.06
    matrix: tuple[tuple[float, float, float], ...] | None = None
    bias: tuple[float, float, float] | None = None

    def affine(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """The colour map as (A [3, 3], b [3]) on ``device``."""
        if self.matrix is not None:
            a = torch.tensor(self.matrix, dtype=torch.float32)
            if a.shape != (3, 3):
                raise ConfigError(f"print matrix must be 3x3, got {tuple(a.shape)}")
        else:
            luma = torch.tensor(_LUMA, dtype=torch.float32)
            a = self.contrast * (
                self.saturation * torch.eye(3) + (1.0 - self.saturation) * luma[None, :].expand(3, 3)
            )
        b = torch.tensor(self.bias if self.bias is not None else (self.black,) * 3, dtype=torch.float32)
        if b.shape != (3,):
            raise ConfigError(f"print bias must have 3 values, got {tuple(b.shape)}")
        return a.to(device), b.to(device)

    def apply(self, patch: Tensor) -> Tensor:
        """Map colours of ``patch`` [..., 3, H, W]; differentiable."""
        a, b = _affine_on(self, str(patch.device))
        out = torch.einsum("ij,...jhw->...ihw", a.to(patch.dtype), patch) + b.to(patch.dtype)[:, None, None]
        return out.clamp(0.0, 1.0)


@functools.lru_cache(maxsize=32)
def _affine_on(model: PrintModel, device: str) -> tuple[Tensor, Tensor]:
    """``model.affine(device)``, built once per model and device: a host-to-device copy every EOT step
    makes the host wait for the device (callers never modify the tensors)."""
    return model.affine(device)


@dataclass(frozen=True)
class PhysicalVariation:
    """Ranges of the physical variation (all symmetric, uniform; pixels are pixels of the crop).

    Defaults are a worn, printed patch in front of a webcam: the patch moves +-3 px / +-4 degrees /
    +-4 % (Sharif's frames moved +-4 px, +-4 degrees), the face crop +-10 px / +-3 degrees / +-5 %,
    lighting +-0.08 brightness, +-15 % contrast, +-0.03 per-channel colour, blur sigma up to 1 px,
    noise std 0.02, and the default :class:`PrintModel`.
    """

    patch_rotation_deg: float = 4.0
    patch_scale: float = 0.04
    patch_translate_px: float = 3.0
    face_rotation_deg: float = 3.0
    face_scale: float = 0.05
    face_translate_px: float = 10.0
    brightness: float = 0.08
    contrast: float = 0.15
    colour_shift: float = 0.03
    blur_sigma: float = 1.0
    noise_std: float = 0.02
    print_model: PrintModel | None = field(default_factory=PrintModel)

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if key != "print_model" and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            ):
                raise ConfigError(f"physical variation {key}={value!r} must be a finite number >= 0")
        if self.patch_scale >= 1 or self.face_scale >= 1 or self.contrast >= 1:
            raise ConfigError(
                "physical variation patch_scale, face_scale and contrast must be < 1 (fractions)"
            )

    @classmethod
    def identity(cls) -> PhysicalVariation:
        """No variation at all: the digital attack (the composite is exact)."""
        zeros = {k: 0.0 for k in asdict(cls()) if k != "print_model"}
        return cls(**zeros, print_model=None)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PhysicalVariation:
        """Build from a config mapping (``print_model``: a mapping, or None/False for no print model)."""
        values = dict(values or {})
        known = set(asdict(cls()))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"physical variation has no setting(s) {unknown}; accepted: {sorted(known)}")
        if "print_model" in values:
            pm = values["print_model"]
            values["print_model"] = (
                None if pm in (None, False) else (pm if isinstance(pm, PrintModel) else PrintModel(**pm))
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def warps_patch(self) -> bool:
        return self.patch_rotation_deg > 0 or self.patch_scale > 0 or self.patch_translate_px > 0

    @property
    def warps_face(self) -> bool:
        return self.face_rotation_deg > 0 or self.face_scale > 0 or self.face_translate_px > 0

    @property
    def is_identity(self) -> bool:
        return self == PhysicalVariation.identity()

    def sample(
        self, n: int, generator: torch.Generator, size: tuple[int, int] = (150, 150), n_faces: int = 1
    ) -> Draws:
        """``n`` draws from ``generator`` (on the generator's device), for crops of ``size`` (H, W).

        ``face_index`` pairs each draw with one of ``n_faces`` photos, stratified (a random offset,
        then every face in turn), so a step with n >= n_faces sees every photo of the attacker.
        """
        if n < 1:
            raise ConfigError(f"need at least one EOT draw, got {n}")
        dev = generator.device

        def sym(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=dev) * 2.0 - 1.0

        # a tensor, not int(): reading it back would make the host wait for the device every step
        offset = torch.randint(0, max(n_faces, 1), (1,), generator=generator, device=dev)
        noise = (
            torch.randn((n, 3, *size), generator=generator, device=dev) * self.noise_std
            if self.noise_std > 0
            else None
        )
        return Draws(
            patch_angle=sym(n) * math.radians(self.patch_rotation_deg),
            patch_scale=1.0 + sym(n) * self.patch_scale,
            patch_shift=sym(n, 2) * self.patch_translate_px,
            face_angle=sym(n) * math.radians(self.face_rotation_deg),
            face_scale=1.0 + sym(n) * self.face_scale,
            face_shift=sym(n, 2) * self.face_translate_px,
            brightness=sym(n) * self.brightness,
            contrast=1.0 + sym(n) * self.contrast,
            colour=sym(n, 3) * self.colour_shift,
            blur_sigma=torch.rand(n, generator=generator, device=dev) * self.blur_sigma,
            noise=noise,
            face_index=(torch.arange(n, device=dev) + offset) % max(n_faces, 1),
        )


@dataclass
class Draws:
    """One batch of sampled physical conditions (tensors [n, ...] on one device)."""

    patch_angle: Tensor
    patch_scale: Tensor
    patch_shift: Tensor  # [n, 2] (x, y) in pixels
    face_angle: Tensor
    face_scale: Tensor
    face_shift: Tensor
    brightness: Tensor
    contrast: Tensor
    colour: Tensor  # [n, 3]
    blur_sigma: Tensor
    noise: Tensor | None  # [n, 3, H, W]
    face_index: Tensor  # long [n]

    def __len__(self) -> int:
        return int(self.patch_angle.shape[0])

    def to(self, device: torch.device | str) -> Draws:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Draws(**moved)

    def select(self, index: Tensor) -> Draws:
        """The draws at ``index`` (e.g. to repeat each draw for several faces)."""
        picked = {
            k: (v.index_select(0, index.to(v.device)) if isinstance(v, Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return Draws(**picked)

    def parameters(self) -> Tensor:
        """All scalar parameters as one [n, 14] tensor (for comparing draws in tests and logs)."""
        cols = [
            self.patch_angle,
            self.patch_scale,
            self.face_angle,
            self.face_scale,
            self.brightness,
            self.contrast,
        ]
        cols += [self.blur_sigma]
        return torch.cat(
            [torch.stack(cols, 1), self.patch_shift, self.face_shift, self.colour.reshape(len(self), -1)], 1
        )


def _affine_theta(
    angle: Tensor, scale: Tensor, shift_px: Tensor, center: Tensor, size: tuple[int, int]
) -> Tensor:
    """``affine_grid`` thetas [n, 2, 3] that rotate by ``angle`` and scale by ``scale`` about
    ``center`` (normalised (x, y)), then translate by ``shift_px``; theta maps output to input."""
    h, w = size
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward map in normalised coords: out = s R (in - c) + c + t; inverse: in = R^T (out - c - t) / s + c
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / scale[:, None, None]
    t = torch.stack([shift_px[:, 0] * 2.0 / w, shift_px[:, 1] * 2.0 / h], -1)
    c = center.to(inv.dtype).expand_as(t)
    offset = c - (inv @ (c + t).unsqueeze(-1)).squeeze(-1)
    return torch.cat([inv, offset.unsqueeze(-1)], -1)


def _grid(theta: Tensor, n: int, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The sampling grid [n, H, W, 2] of ``affine_grid`` thetas (output to input)."""
    return F.affine_grid(theta.to(dtype), [n, 1, *size], align_corners=False)


def _sample(x: Tensor, grid: Tensor, padding: str) -> Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _warp(x: Tensor, theta: Tensor, padding: str) -> Tensor:
    return _sample(x, _grid(theta, x.shape[0], image_size(x), x.dtype), padding)


def _blur(x: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur with one sigma per sample (grouped convolution, one pass per axis).

    Both axes are replicate-padded up front (padding rows commutes with filtering along them) and
    the depthwise passes run in channels-last memory, where oneDNN is ~2x faster than channels-first.
    """
    n, ch, h, w = x.shape
    radius = max(1, int(math.ceil(3.0 * max_sigma)))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [n*ch, k]
    last = torch.channels_last
    flat = F.pad(x.reshape(1, n * ch, h, w), (radius,) * 4, mode="replicate").contiguous(memory_format=last)
    flat = F.conv2d(flat, kernel[:, None, None, :].contiguous(memory_format=last), groups=n * ch)
    flat = F.conv2d(flat, kernel[:, None, :, None].contiguous(memory_format=last), groups=n * ch)
    return flat.reshape(n, ch, h, w)


def mask_center(mask: Tensor) -> Tensor:
    """The mask's centroid in ``affine_grid``'s normalised (x, y) coordinates, [1, 2]."""
    m = mask.reshape(mask.shape[-2:]).float()
    h, w = m.shape
    ys = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) * 2.0 / h - 1.0
    xs = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) * 2.0 / w - 1.0
    total = m.sum().clamp_min(1e-6)
    return torch.stack([(m.sum(0) * xs).sum() / total, (m.sum(1) * ys).sum() / total])[None]


def apply_patch(
    faces: Tensor, patch: Tensor, mask: Tensor, draws: Draws | None, variation: PhysicalVariation
) -> Tensor:
    """Composite ``patch`` [3, H, W] through ``mask`` [1, 1, H, W] onto ``faces`` [n, 3, H, W] under
    the n ``draws`` (one per face); differentiable w.r.t. ``patch``. Returns [n, 3, H, W] in [0, 1].

    With ``draws`` None (or the identity variation) this is the exact digital composite
    ``faces * (1 - mask) + patch * mask``: pixels outside the mask are returned bit-for-bit.
    """
    n, _, h, w = faces.shape
    p = patch.reshape(1, 3, h, w).to(faces.dtype)
    m = mask.reshape(1, 1, h, w).to(faces.dtype)
    if draws is None or variation.is_identity:
        return (faces * (1.0 - m) + p * m).clamp(0.0, 1.0)
    if len(draws) != n:
        raise ConfigError(f"{len(draws)} physical draws for {n} faces; pass one draw per face")
    if variation.print_model is not None:
        p = variation.print_model.apply(p)
    if variation.warps_patch:
        theta = _affine_theta(draws.patch_angle, draws.patch_scale, draws.patch_shift, mask_center(m), (h, w))
        grid = _grid(theta, n, (h, w), p.dtype)
        premultiplied = _sample((p * m).expand(n, 3, h, w), grid, "zeros")
        # the mask apart from the colours, without a gradient (it does not depend on the patch): the
        # backward pass then runs over 3 channels, not 4 (same values: channels are sampled alone)
        with torch.set_grad_enabled(torch.is_grad_enabled() and m.requires_grad):
            alpha = _sample(m.expand(n, 1, h, w), grid, "zeros")
    else:
        premultiplied, alpha = (p * m).expand(n, 3, h, w), m.expand(n, 1, h, w)
    x = faces * (1.0 - alpha) + premultiplied
    if variation.warps_face:
        zero = torch.zeros(1, 2, device=x.device, dtype=x.dtype)
        x = _warp(
            x, _affine_theta(draws.face_angle, draws.face_scale, draws.face_shift, zero, (h, w)), "border"
        )
    if variation.contrast > 0 or variation.brightness > 0 or variation.colour_shift > 0:
        x = (x - 0.5) * draws.contrast[:, None, None, None] + 0.5
        x = x + draws.brightness[:, None, None, None] + draws.colour[:, :, None, None]
    if variation.blur_sigma > 0:
        x = _blur(x, draws.blur_sigma, variation.blur_sigma)
    if draws.noise is not None and variation.noise_std > 0:
        x = x + draws.noise.to(x.dtype)
    return x.clamp(0.0, 1.0)
