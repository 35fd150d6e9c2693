"""The threat model: what the attacker may change (norm ball, eps list), aim for and know.

One typed object shared by attacks, the battery, checks and reports, so "eps" means the same thing
everywhere: a radius in raw [0,1] pixel units (never in normalized units; the Classifier owns the
normalization), for the L-inf or L2 norm of the perturbation of one image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustcnn.config import config_bool, config_float, config_int, show
from robustcnn.errors import ConfigError

NORMS = ("linf", "l2")
TARGET_SELECTIONS = ("random", "least_likely", "fixed")
KNOWLEDGE = ("white_box", "black_box")
#: Most radii one threat model may list: every attack runs once per radius (and each is a metric,
#: a plot point and a table column), so thousands are a mistake, not a finer curve.
MAX_EPS = 100


@dataclass(frozen=True)
class ThreatModel:
    """norm + eps list (ascending, pixel units) + targeting + attacker knowledge."""

    norm: str = "linf"
    eps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    targeted: bool = False
    target: str = "random"
    target_class: int | None = None
    knowledge: str = "white_box"
    #: The eps the verdict is judged at (the field's standard radius); None means the largest eps.
    reference_eps: float | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"threat.norm={self.norm!r} is unknown; choose one of {', '.join(NORMS)}")
        if not self.eps:
            raise ConfigError("threat.eps is empty; give at least one radius, e.g. threat.eps=[0,0.1,0.3]")
        if len(self.eps) > MAX_EPS:
            raise ConfigError(
                f"threat.eps has {len(self.eps)} radii; at most {MAX_EPS} are allowed (every attack runs "
                "once per radius): give fewer, e.g. threat.eps=[0,0.1,0.2,0.3]"
            )
        for value in self.eps:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"threat.eps contains {show(value)}; every eps must be a finite number")
            if value < 0:
                raise ConfigError(f"threat.eps contains {value}; eps is a radius and must be >= 0")
            if self.norm == "linf" and value > 1:
                raise ConfigError(
                    f"threat.eps contains {value} for the linf norm; eps is in [0,1] pixel units "
                    "(8/255 = 0.0314), so values above 1 are meaningless"
                )
        if list(self.eps) != sorted(self.eps):
            raise ConfigError(f"threat.eps={list(self.eps)} must be sorted ascending")
        if len(set(self.eps)) != len(self.eps):
            raise ConfigError(f"threat.eps={list(self.eps)} has repeated values")
        if self.target not in TARGET_SELECTIONS:
            raise ConfigError(
                f"threat.target={self.target!r} is unknown; choose one of {', '.join(TARGET_SELECTIONS)}"
            )
        if self.targeted and self.target == "fixed" and self.target_class is None:
            raise ConfigError("threat.target=fixed needs threat.target_class=<class index>")
        if self.reference_eps is not None and self.reference_eps not in self.eps:
            raise ConfigError(
                f"threat.reference_eps={self.reference_eps} is not one of threat.eps={list(self.eps)}"
            )
        if self.knowledge not in KNOWLEDGE:
            raise ConfigError(
                f"threat.knowledge={self.knowledge!r} is unknown; choose one of {', '.join(KNOWLEDGE)}"
            )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ThreatModel:
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"threat={show(cfg)} must be a section; pick a preset, e.g. threat=mnist_linf")
        eps = cfg.get("eps", cls.eps)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            eps = [eps]
        if not isinstance(eps, Sequence) or isinstance(eps, str):
            raise ConfigError(
                f"threat.eps={show(eps)} must be a list of numbers, e.g. threat.eps=[0,0.1,0.3]"
            )
        known = {"name", "norm", "eps", "targeted", "target", "target_class", "knowledge", "reference_eps"}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown threat keys {sorted(unknown)}; accepted: {sorted(known)}")
        target_class = cfg.get("target_class")
        reference_eps = cfg.get("reference_eps")
        return cls(
            norm=str(cfg.get("norm", cls.norm)).lower(),
            eps=tuple(
                float(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else e for e in eps
            ),
            targeted=config_bool(cfg.get("targeted", False), "threat.targeted"),
            target=str(cfg.get("target", "random")),
            target_class=None
            if target_class is None
            else config_int(target_class, "threat.target_class", minimum=0, hint=" (a class index)"),
            knowledge=str(cfg.get("knowledge", "white_box")),
            reference_eps=None
            if reference_eps is None
            else config_float(reference_eps, "threat.reference_eps", minimum=0.0),
        )

    def check_input_size(self, input_shape: Sequence[int]) -> None:
        """An L2 radius larger than the diameter of the [0,1] cube is meaningless: reject it early."""
        if self.norm == "l2":
            diameter = math.sqrt(math.prod(input_shape))
            if max(self.eps) > diameter:
                raise ConfigError(
                    f"threat.eps max {max(self.eps)} exceeds the L2 diameter {diameter:.1f} of the "
                    f"{list(input_shape)} input cube; use smaller radii"
                )

    def choose_targets(
        self, logits: Tensor, y: Tensor, num_classes: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Target labels for a targeted attack (never equal to the true label)."""
        if self.target == "fixed":
            assert self.target_class is not None
            if not 0 <= self.target_class < num_classes:
                raise ConfigError(
                    f"threat.target_class={self.target_class} is outside [0, {num_classes - 1}]"
                )
            return torch.full_like(y, self.target_class)
        if self.target == "least_likely":
            masked = logits.detach().clone()
            masked[torch.arange(y.shape[0], device=y.device), y] = float("inf")
            return masked.argmin(1)
        offset = torch.randint(1, num_classes, y.shape, generator=generator, device="cpu").to(y.device)
        return (y + offset) % num_classes

    def to_dict(self) -> dict[str, Any]:
        return {
            "norm": self.norm,
            "eps": list(self.eps),
            "targeted": self.targeted,
            "target": self.target,
            "target_class": self.target_class,
            "knowledge": self.knowledge,
            "reference_eps": self.reference_eps,
        }


def perturbation_norms(delta: Tensor, norm: str) -> Tensor:
    """Per-sample norm of a perturbation batch [N, ...] -> [N]."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    return flat.norm(p=2, dim=1)


def project(
    x_adv: Tensor, x: Tensor, eps: float | Tensor, norm: str, bounds: tuple[float, float] = (0.0, 1.0)
) -> Tensor:
    """Project ``x_adv`` onto the eps ball around ``x`` intersected with the box ``bounds``.

    ``eps``: one radius, or one per sample (a tensor [N]: a minimum-norm attack's norm constraints).
    """
    delta = x_adv - x
    shape = (-1, *([1] * (delta.dim() - 1)))
    if norm == "linf":
        if isinstance(eps, Tensor):
            radius = eps.view(shape)
            delta = torch.maximum(torch.minimum(delta, radius), -radius)
        else:
            delta = delta.clamp(-eps, eps)
    else:
        norms = perturbation_norms(delta, "l2").clamp_min(1e-12)
        factor = (eps / norms).clamp(max=1.0).view(shape)
        delta = delta * factor
    return (x + delta).clamp(*bounds)
