"""What the model looks at, clean vs adversarial: attribution maps of the kept examples (captum).

For each kept example (at most ``eval.keep_examples``, 8 by default) and its adversarial version
at the reference eps, three maps, each for the predicted and for the true class:

- ``saliency``: the input gradient of the class score (Simonyan et al. 2014);
- ``integrated_gradients``: the gradient integrated along the straight path from a black image
  (Sundararajan et al. 2017): ``(x - baseline) * mean gradient``, exact for a linear model;
- ``grad_cam``: Grad-CAM at the last conv layer (Selvaraju et al. 2017), upsampled to the image.

Why captum: a well-kept implementation of all three, pure PyTorch. Why only the kept examples:
the maps cost a few gradient passes over <= 32 images, which a sweep of many small jobs pays
per cell. The quantitative companion, **attribution stability**, is the Spearman rank correlation
between the clean and the adversarial map for the true class, averaged over the examples: near 1,
the attack changed the prediction without moving where the model looks; near 0, the map moved.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustcnn.background import BackgroundLoad

log = logging.getLogger(__name__)

METHODS = ("saliency", "integrated_gradients", "grad_cam")
#: Integrated Gradients' path points (Gauss-Legendre: exact for a linear model, close for a small CNN).
#: Why only 8: IG is the one costly method (steps x the stacked images, forward and backward), and a
#: map for display needs no tighter integral.
IG_STEPS = 8
#: Rows of the attribution grid per method, in order: (which image, which class).
VARIANTS = (("clean", "predicted"), ("adversarial", "predicted"), ("clean", "true"), ("adversarial", "true"))


def _import_captum() -> Any:
    importlib.import_module("scipy.stats")  # the rank correlation's (~0.5 s on first import)
    return importlib.import_module("captum.attr")


#: Import captum and scipy.stats on a daemon thread while the job trains and attacks: ``import
#: captum`` loads matplotlib.pyplot and all of captum's subpackages (~1 s), which a job would
#: otherwise pay after its attacks (see robustcnn.background).
preload = BackgroundLoad("robustcnn-captum-preload", _import_captum).start


@dataclass(frozen=True)
class Attributions:
    """The kept examples' maps: ``maps[method]`` is [4, k, H, W] (rows as :data:`VARIANTS`), >= 0."""

    clean: Tensor  # [k, C, H, W]
    adversarial: Tensor  # [k, C, H, W]
    labels: Tensor  # [k]
    predictions: Tensor  # [2, k]: clean, adversarial
    maps: dict[str, Tensor]
    stability: dict[str, float | None]
    per_example: dict[str, list[float | None]] = field(default_factory=dict)
    eps: float = 0.0
    attack: str = ""
    seconds: float = 0.0
    #: The signed input gradient of the true class's score at each clean example [k, C, H, W]: the
    #: perceptually-aligned-gradients view (Tsipras et al. 2019) the dashboard lays out per defense.
    gradients: Tensor | None = None

    def summary(self) -> dict[str, Any]:
        """What results.json keeps (the maps themselves are in the PNG)."""
        return {
            "methods": [m for m in METHODS if m in self.maps],
            "examples": int(self.labels.shape[0]),
            "eps": self.eps,
            "attack": self.attack,
            "stability": dict(self.stability),
            "per_example_stability": {k: list(v) for k, v in self.per_example.items()},
            "seconds": self.seconds,
        }


def last_conv(model: nn.Module) -> nn.Conv2d | None:
    """The last Conv2d in module order (Grad-CAM's layer); None for a model without one."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


class GradCamUndefined(ValueError):
    """Grad-CAM of a model whose forward repeats the batch (an EOT or ensemble wrapper) is not per image."""


def raw_attributions(model: nn.Module, x: Tensor, target: Tensor, method: str) -> Tensor:
    """Signed attributions of ``target`` per image, [n, C, H, W] (Grad-CAM: [n, 1, H, W], upsampled).

    ``x`` on the model's device; the model in eval mode. Grad-CAM needs a conv layer (ValueError).
    """
    attr = _import_captum()
    x = x.detach().requires_grad_(True)  # captum would set it, with a warning per call
    if method == "saliency":
        return attr.Saliency(model).attribute(x, target=target, abs=False).detach()
    if method == "integrated_gradients":
        ig = attr.IntegratedGradients(model)
        return ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=IG_STEPS).detach()
    if method == "grad_cam":
        layer = last_conv(model)
        if layer is None:
            raise ValueError("Grad-CAM needs a conv layer; this model has none")
        cam = attr.LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        if cam.shape[0] != x.shape[0]:
            raise GradCamUndefined(
                f"the model's last conv layer sees {cam.shape[0]} images for {x.shape[0]} inputs (a wrapper "
                "that repeats the batch, e.g. EOT averaging): Grad-CAM has no per-image map there"
            )
        return attr.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear").detach()
    raise ValueError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")


def display_map(raw: Tensor) -> Tensor:
    """A non-negative [n, H, W] map: the absolute attribution summed over the colour channels."""
    return raw.abs().sum(dim=1)


def rank_correlation(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rho of two maps (ties get their average rank); None when either map is constant."""
    from scipy.stats import spearmanr

    x, y = a.flatten().double().cpu().numpy(), b.flatten().double().cpu().numpy()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def variant_maps(
    model: nn.Module, clean: Tensor, adversarial: Tensor, predicted: Tensor, truth: Tensor, method: str
) -> Tensor:
    """One method's display maps [4, k, H, W] in :data:`VARIANTS` order.

    The true-class map of an image the model classifies correctly is its predicted-class map
    (the same image and class): only the others are computed again, which on a well-trained model
    spares most of the clean rows.
    """
    images = torch.cat([clean, adversarial])
    own = display_map(raw_attributions(model, images, torch.cat([predicted[0], predicted[1]]), method))
    differ = torch.cat([predicted[0] != truth, predicted[1] != truth])
    true_class = own.clone()
    if bool(differ.any()):
        true_class[differ] = display_map(
            raw_attributions(model, images[differ], truth.repeat(2)[differ], method)
        )
    return torch.cat([own, true_class]).reshape(4, clean.shape[0], *own.shape[-2:]).cpu()


def explain(
    model: nn.Module,
    clean: Tensor,
    adversarial: Tensor,
    labels: Tensor,
    *,
    eps: float = 0.0,
    attack: str = "",
) -> Attributions:
    """Every method's maps of ``clean`` and ``adversarial`` ([k, C, H, W]) for predicted and true class.

    A couple of captum calls per method on the stacked images, so the cost is a handful of passes;
    the model keeps its mode and device, its parameters get no gradient.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        clean_d, adv_d = clean.to(device).float(), adversarial.to(device).float()
        truth = labels.to(device).long()
        with torch.no_grad():
            predicted = torch.stack([model(clean_d).argmax(1), model(adv_d).argmax(1)])
        methods = [m for m in METHODS if m != "grad_cam" or last_conv(model) is not None]
        maps = {}
        with torch.enable_grad():
            for method in methods:
                try:
                    maps[method] = variant_maps(model, clean_d, adv_d, predicted, truth, method)
                except GradCamUndefined as why:
                    log.warning("attributions: %s; skipped", why)
            gradients = raw_attributions(model, clean_d, truth, "saliency").cpu()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    k = clean.shape[0]
    per_example = {m: [rank_correlation(v[2, j], v[3, j]) for j in range(k)] for m, v in maps.items()}
    return Attributions(
        clean=clean.detach().cpu(),
        adversarial=adversarial.detach().cpu(),
        labels=labels.detach().cpu(),
        predictions=predicted.cpu(),
        maps=maps,
        stability={m: _mean(v) for m, v in per_example.items()},
        per_example=per_example,
        eps=float(eps),
        attack=attack,
        seconds=time.perf_counter() - started,
        gradients=gradients,
    )
