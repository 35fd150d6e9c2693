"""Does the patch draw the recognizer's attention? Its saliency on the clean and on the patched face.

For each patch, the input-gradient saliency (Simonyan et al. 2014, through captum) of the
recognizer's similarity to the template the attack is about, on the attacker's face without and with
the patch: the enrolled template of the attacker (dodging: the similarity the patch pushes down) or
of the target (impersonation: the one it pulls up). Similarity is the negative Euclidean distance of
the descriptors, the recognizer's own decision rule.

The number beside the maps: the fraction of the saliency mass (|gradient| summed over colour
channels) that falls inside the patch mask, clean vs patched, next to the mask's share of the image
(what attention spread evenly would give). A patch that draws the attention raises the fraction well
above both.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustcnn.face.patch import frozen_modules
from robustcnn.models.face.recognizer import FaceRecognizer

__all__ = ["FaceSaliency", "face_saliency", "mass_inside", "patch_saliency"]


class _Similarity(nn.Module):
    """faces [n, 3, H, W] -> [n, 1]: minus the distance of each face's descriptor to ``template``."""

    def __init__(self, recognizer: FaceRecognizer, template: Tensor) -> None:
        super().__init__()
        self.recognizer = recognizer
        self.template = template.detach()

    def forward(self, faces: Tensor) -> Tensor:
        return -self.recognizer.distance(self.recognizer.embed(faces), self.template)[:, None]


def face_saliency(recognizer: FaceRecognizer, faces: Tensor, template: Tensor) -> Tensor:
    """|d similarity / d pixel| summed over the colour channels, [n, H, W], for ``faces`` [n, 3, H, W].

    The recognizer is frozen (eval mode, no parameter gradients) for the call, as in the attack.
    """
    saliency = importlib.import_module("captum.attr").Saliency
    forward = _Similarity(recognizer, template.to(faces.device))
    x = faces.detach().clone().requires_grad_(True)  # captum would set it, with a warning per call
    with frozen_modules([recognizer.embedder]), torch.enable_grad():
        grads = saliency(forward).attribute(x, target=0, abs=True)
    return grads.detach().sum(dim=1)


def mass_inside(saliency: Tensor, mask: Tensor) -> list[float | None]:
    """Per map [n, H, W], the share of its total inside ``mask`` (pixels > 0.5); None for an all-zero map."""
    inside = (mask.reshape(saliency.shape[-2:]) > 0.5).to(saliency.dtype)
    totals = saliency.flatten(1).sum(1)
    within = (saliency * inside).flatten(1).sum(1)
    return [float(w / t) if t > 0 else None for w, t in zip(within.tolist(), totals.tolist(), strict=True)]


@dataclass(frozen=True)
class FaceSaliency:
    """One patch's saliency maps [H, W] on the clean and the patched face, and the shares of mass."""

    clean: Tensor
    patched: Tensor
    clean_mass_in_patch: float | None
    patched_mass_in_patch: float | None
    patch_area_fraction: float
    template: str  # whose enrolled template the similarity is to

    def summary(self) -> dict[str, Any]:
        """What results.json keeps per patch (the maps are in the PNG)."""
        return {
            "template": self.template,
            "clean_mass_in_patch": self.clean_mass_in_patch,
            "patched_mass_in_patch": self.patched_mass_in_patch,
            "patch_area_fraction": self.patch_area_fraction,
        }


def patch_saliency(
    recognizer: FaceRecognizer, clean: Tensor, patched: Tensor, template: Tensor, mask: Tensor, whose: str
) -> FaceSaliency:
    """Both maps of one patch: ``clean`` and ``patched`` faces [3, H, W], ``template`` [D] (``whose``)."""
    maps = face_saliency(recognizer, torch.stack([clean, patched]), template).cpu()
    shares = mass_inside(maps, mask.cpu())
    area = float((mask.detach().cpu() > 0.5).float().mean())
    return FaceSaliency(maps[0], maps[1], shares[0], shares[1], area, whose)
