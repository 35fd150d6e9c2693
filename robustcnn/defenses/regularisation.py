"""Regularisation as a defense: weight decay (L2), an L1 penalty, and input-gradient regularisation.

Why these three: practitioners are told that "L1/L2 regularisation makes a model more robust";
each is a defense here so the claim is measured by the same battery as adversarial training.
Weight decay and L1 act on the weights alone; input-gradient regularisation (Ross & Doshi-Velez
2018, "double backprop") penalises the norm of the loss gradient with respect to the input, the
one of the three with a known link to adversarial robustness (a small input gradient means a
small first-order loss increase inside the eps ball).

Composition is the runner's, as for every defense: with ``base`` set (``defense.base=pgd_at``) the
base's trained model is fine-tuned with the regulariser for ``finetune_epochs``; pruning composes
the other way round (``defense=prune defense.base=l1``: prune the L1-trained model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.config import config_bool, config_float, config_int, show
from robustcnn.defenses.base import Defense, JobFit, register_defense
from robustcnn.defenses.pruning import prunable_weights
from robustcnn.errors import ConfigError
from robustcnn.training.loop import TrainContext, TrainHook

#: Norms of the input gradient input_gradient penalises: squared L2 (Ross & Doshi-Velez) or L1
#: (the dual of L-inf, the norm whose first-order loss increase an L-inf attack of radius eps gets).
GRADIENT_NORMS = ("l2", "l1")


def weight_statistics(model: nn.Module, zero_threshold: float) -> dict[str, float]:
    """Norms and sparsity of the conv+linear weights (the ones pruning counts), for the report.

    ``near_zero_fraction``: weights with ``|w| <= zero_threshold``. Why a threshold: an L1 penalty
    trained by Adam's subgradient steps leaves weights oscillating around zero, rarely exactly at it.
    """
    weights = [w.detach().float().flatten() for _, w in prunable_weights(model)]
    if not weights:
        return {}
    flat = torch.cat(weights)
    return {
        "weight_l1_norm": float(flat.abs().sum()),
        "weight_l2_norm": float(flat.norm()),
        "near_zero_fraction": float((flat.abs() <= zero_threshold).float().mean()),
        "exact_zero_fraction": float((flat == 0).float().mean()),
        "zero_threshold": float(zero_threshold),
    }


class _RegularisedDefense(Defense):
    """What the three share: ``strength``, fine-tuning a ``base``, the weight statistics reported."""

    def __init__(
        self,
        *,
        strength: float,
        finetune_epochs: int = 1,
        zero_threshold: float = 1e-3,
        base: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(base=base)
        self.strength = config_float(
            strength, "defense.strength", minimum=0.0, hint=" (0 = no regularisation)"
        )
        self.finetune_epochs = config_int(
            finetune_epochs, "defense.finetune_epochs", minimum=1, hint=" (epochs on top of defense.base)"
        )
        self.zero_threshold = config_float(
            zero_threshold, "defense.zero_threshold", minimum=0.0, hint=" (|w| counted as zero)"
        )
        self._report: dict[str, Any] = {}

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "strength": self.strength,
            "finetune_epochs": self.finetune_epochs,
            "zero_threshold": self.zero_threshold,
        }

    def post_train(
        self,
        model: nn.Module,
        x_train: Tensor,
        y_train: Tensor,
        device: torch.device,
        fit: JobFit,
        seed: int,
    ) -> dict[str, Any]:
        """Fine-tune the base model with the regulariser (when ``base`` is set), then measure the weights."""
        if self.base is not None:
            fit(model, hooks=self.hooks(seed, x_train, y_train), epochs=self.finetune_epochs)
        self._report = weight_statistics(model, self.zero_threshold)
        return dict(self._report)

    def report(self) -> dict[str, Any]:
        return dict(self._report)


@register_defense("weight_decay")
class WeightDecay(_RegularisedDefense):
    """L2 weight decay, coupled (added to the gradient, Adam's ``weight_decay``) or decoupled (AdamW).

    Why both: with Adam the coupled form is rescaled per weight by the adaptive denominator, so a
    weight with large gradients is barely decayed; the decoupled form shrinks every weight by the
    same factor ``1 - lr * strength`` per step (Loshchilov & Hutter 2019). The job's
    ``training.optimizer.weight_decay`` is replaced by ``strength`` for this defense's training.
    """

    def __init__(self, *, strength: float = 5e-4, decoupled: bool = False, **shared: Any) -> None:
        super().__init__(strength=strength, **shared)
        self.decoupled = config_bool(decoupled, "defense.decoupled")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "decoupled": self.decoupled}

    def training_overrides(self) -> dict[str, Any]:
        return {"weight_decay": self.strength, "decoupled_weight_decay": self.decoupled}


class L1Penalty(TrainHook):
    """``strength * sum |w|`` over the conv+linear weights, added to every batch's loss."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def penalty(self, ctx: TrainContext) -> Tensor | None:
        if self.strength == 0:
            return None
        weights = [w for _, w in prunable_weights(ctx.model)]
        return self.strength * torch.stack([w.abs().sum() for w in weights]).sum() if weights else None


@register_defense("l1")
class L1Regularisation(_RegularisedDefense):
    """An L1 penalty on the weights: drives many of them towards zero (the sparsity is reported)."""

    def __init__(self, *, strength: float = 1e-4, **shared: Any) -> None:
        super().__init__(strength=strength, **shared)

    def hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        return [L1Penalty(self.strength)]


class InputGradientHook(TrainHook):
    """Cross-entropy plus ``strength`` x the mean per-image norm of d(loss)/d(input) (double backprop).

    The per-image gradient is that of the image's own loss (a summed loss, not the batch mean, whose
    gradient would shrink with the batch size). ``create_graph`` keeps it differentiable, so the
    outer backward pass reaches the weights through it: ~2-3x a standard batch. The mean gradient
    norm and the accuracy of each epoch are logged (``train/input_grad_norm``).
    """

    def __init__(self, strength: float, norm: str) -> None:
        self.strength, self.norm = strength, norm
        self._sums: tuple[Tensor, Tensor] | None = None
        self._counted = 0

    def compute_loss(self, ctx: TrainContext, x: Tensor, y: Tensor) -> Tensor | None:
        inputs = x.detach().requires_grad_(True)
        with ctx.autocast():
            logits = ctx.model(inputs).float()
        losses = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(losses.sum(), inputs, create_graph=True)
        flat = grad.flatten(1).float()
        norms = flat.pow(2).sum(1) if self.norm == "l2" else flat.abs().sum(1)
        hits = (logits.detach().argmax(1) == y).sum()
        size = norms.detach().sqrt().sum() if self.norm == "l2" else norms.detach().sum()
        self._sums = (hits, size) if self._sums is None else (self._sums[0] + hits, self._sums[1] + size)
        self._counted += y.shape[0]
        return losses.mean() + self.strength * norms.mean()

    def batch_state(self) -> object:
        return self._sums, self._counted

    def restore_batch_state(self, state: object) -> None:
        self._sums, self._counted = cast(tuple[tuple[Tensor, Tensor] | None, int], state)

    def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        if self._sums is not None and self._counted:
            metrics["train_accuracy"] = float(self._sums[0].item()) / self._counted
            metrics["input_grad_norm"] = float(self._sums[1].item()) / self._counted
        self._sums, self._counted = None, 0


@register_defense("input_gradient")
class InputGradientRegularisation(_RegularisedDefense):
    """Ross & Doshi-Velez 2018: penalise the norm of the loss gradient with respect to the input."""

    def __init__(self, *, strength: float = 1.0, norm: str = "l2", **shared: Any) -> None:
        super().__init__(strength=strength, **shared)
        if norm not in GRADIENT_NORMS:
            raise ConfigError(
                f"defense.norm={show(norm)} is unknown; choose one of {', '.join(GRADIENT_NORMS)}"
            )
        self.norm = norm

    def params(self) -> dict[str, Any]:
        return {**super().params(), "norm": self.norm}

    def hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        return [InputGradientHook(self.strength, self.norm)]
