"""FGSM and PGD run by the Adversarial Robustness Toolbox (``attack.backend=art``), with our meaning.

Why subclasses of our FGSM/PGD: they accept exactly the native settings and report the same
``params()``, so one config means one attack whichever library runs it (see the torchattacks
backend). ART's defaults differ from ours in ways that silently change the numbers, so every one
of them is set explicitly:

* random start: ART starts at the clean input unless ``num_random_init > 0``; here
  ``num_random_init = restarts if random_start else 0``. ART keeps, per sample, the last
  successful restart (ours keeps the first): the same samples count as fooled;
* labels: ART attacks the model's *predicted* labels when ``y`` is None; the true labels (or, in
  targeted mode, the base's targets with ``targeted=True``) are always passed, one-hot;
* batch size: ART's default is 32; ours is passed;
* progress bars: ART's PGD shows tqdm bars by default; ``verbose=False``;
* norm ``np.inf`` / 2, ``eps_step`` = our :meth:`PGD.alpha`, ``max_iter`` = steps,
  ``clip_values`` = the model's bounds;
* loss: ART differentiates whatever loss its estimator holds. ``CrossEntropyLoss(reduction="sum")``
  for ``loss=ce`` (a sum, like the native objective: a batch mean would shrink per-sample
  gradients by the batch size, which matters for ART's L2 normalisation tolerance), and for
  ``loss=margin`` the CW margin written so that ART's "ascend untargeted / descend towards the
  target" rule gives exactly the native margin objective;
* random numbers: ART draws its random start from numpy's global RNG, which is seeded from
  ``attack.seed`` (batch, eps) and restored afterwards.

Not available: ``eot_samples > 1`` (ART's loss gradient is one draw; use backend=native).

Cost: ART works on numpy arrays, so every batch is copied to host memory and back, and each PGD
step crosses numpy <-> torch (and the device) inside ART; expect it to be the slowest backend,
most of all on a GPU. Like torchattacks, ART returns the last PGD iterate, whereas native PGD
keeps the first iterate that reaches the goal (native can only be as strong or slightly stronger).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from robustcnn.attacks.backends.common import (
    CountedLogits,
    backend_seed,
    check_installed,
    import_library,
    number_of_classes,
    on_device,
    preserved_model_state,
    seeded_rng,
)
from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.fgsm import FGSM
from robustcnn.attacks.gradient import GradientOptions
from robustcnn.attacks.pgd import PGD, PGDOptions
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it

BACKEND = "art"
INSTALL = "pip install adversarial-robustness-toolbox"
ART_NORMS = {"linf": np.inf, "l2": 2}


class MarginLoss(nn.Module):
    """Summed CW margin ``max_{j != label} z_j - z_label`` for ART's estimator.

    ART ascends the loss w.r.t. the true label when untargeted (the native untargeted margin) and
    descends it w.r.t. the target when targeted, i.e. ascends ``z_target - max_{j != target} z_j``
    (the native targeted margin). ART hands a custom loss one-hot labels, so both forms are accepted.
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        label = labels.argmax(1) if labels.dim() == 2 else labels.long()
        true = logits.gather(1, label[:, None]).squeeze(1)
        others = logits.scatter(1, label[:, None], float("-inf")).amax(1)
        return (others - true).sum()


def _check_settings(attack: FGSM | PGD) -> None:
    """Refuse, at config time, settings ART cannot honour (instead of silently ignoring them)."""
    check_installed("art", INSTALL, BACKEND)
    if attack.eot_samples > 1:
        raise ConfigError(
            f"attack.eot_samples={attack.eot_samples} is not available with attack.backend=art "
            "(its loss gradient uses a single forward pass); use attack.backend=native"
        )


def _run_art(
    attack: FGSM | PGD,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    targets: Tensor | None,
    ctx: PerturbContext,
    make: Callable[[Any], Any],  # ART classifier -> ART attack (Any: ART ships no type information)
) -> Tensor:
    """Wrap the model in a ``PyTorchClassifier``, build the attack with ``make(classifier)``, run it.

    The model's modes, ``requires_grad`` flags and parameter ``.grad`` are restored afterwards
    (ART's ``loss_gradient`` calls ``model.zero_grad()``), and the global RNGs are seeded and
    restored. One numpy copy in and one out per batch.
    """
    classification = import_library("art.estimators.classification", INSTALL, BACKEND)
    nb_classes = number_of_classes(model, x, ctx)
    loss: nn.Module = nn.CrossEntropyLoss(reduction="sum") if attack.loss == "ce" else MarginLoss()
    labels = (targets if targets is not None else y).cpu().numpy()
    one_hot = np.eye(nb_classes, dtype=np.float32)[labels]
    x_np = x.detach().cpu().numpy().astype(np.float32)
    with (
        preserved_model_state(model),
        on_device(x.device),
        seeded_rng(backend_seed(attack.seed, ctx, 0), x.device),
    ):
        classifier = classification.PyTorchClassifier(
            model=CountedLogits(model, ctx),
            loss=loss,
            input_shape=tuple(x.shape[1:]),
            nb_classes=nb_classes,
            clip_values=tuple(float(b) for b in ctx.bounds),
            preprocessing=None,
            device_type="gpu" if x.device.type == "cuda" else "cpu",
        )
        with warnings.catch_warnings():
            # ART's restart bookkeeping hands torch tensors to np.array (numpy 2 deprecation): not ours
            warnings.filterwarnings(
                "ignore",
                message="__array__ implementation doesn.t accept a copy",
                category=DeprecationWarning,
            )
            adv = make(classifier).generate(x_np, y=one_hot)
    return torch.from_numpy(np.ascontiguousarray(adv)).to(device=x.device, dtype=x.dtype)


class ArtFGSM(FGSM):
    """FGSM (L-inf) / FGM (L2) computed by ``art.attacks.evasion.FastGradientMethod``."""

    backend = BACKEND

    def __init__(self, **kwargs: Unpack[GradientOptions]) -> None:
        super().__init__(**kwargs)
        _check_settings(self)

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        threat: ThreatModel,
        targets: Tensor | None,
        ctx: PerturbContext,
    ) -> Tensor:
        evasion = import_library("art.attacks.evasion", INSTALL, BACKEND)

        def make(classifier: Any) -> Any:  # ART objects (Any: ART ships no type information)
            return evasion.FastGradientMethod(
                classifier,
                norm=ART_NORMS[threat.norm],
                eps=float(eps),
                eps_step=float(eps),
                targeted=targets is not None,
                num_random_init=0,
                batch_size=self.batch_size,
                minimal=False,
            )

        return _run_art(self, model, x, y, targets, ctx, make)


class ArtPGD(PGD):
    """PGD computed by ``art.attacks.evasion.ProjectedGradientDescentPyTorch``."""

    backend = BACKEND

    def __init__(self, **kwargs: Unpack[PGDOptions]) -> None:
        super().__init__(**kwargs)
        _check_settings(self)

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        threat: ThreatModel,
        targets: Tensor | None,
        ctx: PerturbContext,
    ) -> Tensor:
        evasion = import_library("art.attacks.evasion", INSTALL, BACKEND)

        def make(classifier: Any) -> Any:  # ART objects (Any: ART ships no type information)
            return evasion.ProjectedGradientDescentPyTorch(
                classifier,
                norm=ART_NORMS[threat.norm],
                eps=float(eps),
                eps_step=float(self.alpha(eps)),
                max_iter=self.steps,
                targeted=targets is not None,
                num_random_init=self.restarts if self.random_start else 0,
                batch_size=self.batch_size,
                random_eps=False,
                verbose=False,
            )

        return _run_art(self, model, x, y, targets, ctx, make)
