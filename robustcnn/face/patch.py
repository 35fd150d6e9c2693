"""The one patch engine: optimise the pixels of a mask under EOT, for faces and classifiers alike.

Why one engine: eyeglasses (Sharif et al. 2016), a hat sticker (AdvHat 2019) and a universal
classifier patch (Brown et al. 2017) differ only in the mask and the loss; the optimisation, the
physical variation, the TV/NPS regularisers and the invariants are the same. The engine minimises

    E_{face k, draw t} [ loss(t(face_k (+) patch)) ] + tv_weight * TV(patch) + nps_weight * NPS(patch)

with a fresh batch of ``eot_samples`` draws every step (each draw paired with one of the attacker's
photos, so several photos give a universal patch). Only mask pixels are parameters: the patch is
exactly the initial value (0) outside the mask, and every composite leaves the rest of the face
untouched. The models the loss uses are put in eval mode with frozen parameters and restored.

``loss_fn(x_adv [n, 3, H, W], face_index [n]) -> loss [n]`` (to minimise) or ``(loss, success)``
with ``success`` bool [n]; with ``success`` the engine can stop early once every draw of
``early_stop_patience`` consecutive steps succeeds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any  # Any: to_dict's JSON values

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks.contract import attack_mode
from robustcnn.batching import autocast_for
from robustcnn.errors import ConfigError
from robustcnn.face.masks import check_mask
from robustcnn.face.printability import (
    NPS_VARIANTS,
    MaskRegion,
    non_printability_score,
    total_variation,
)
from robustcnn.face.transforms import Draws, PhysicalVariation, apply_patch, draw_generator, image_size

LossOutput = Tensor | tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], LossOutput]

OPTIMIZERS = ("sign", "adam")
INITS = ("random", "grey")


@dataclass
class PatchSettings:
    """How a patch is optimised. Defaults: a digital-to-physical face patch in a few hundred steps.

    * ``optimizer``: "sign" (signed gradient with momentum, AdvHat / MI-FGSM style: robust to the
      loss scale) or "adam" (``step_size`` is Adam's learning rate, ``momentum`` its beta1).
    * ``eot_samples``: draws per step (a fresh batch every step).
    * ``eot_batch``: draws per forward pass of the model (None: all ``eot_samples`` in one pass, the
      fastest; smaller trades speed for memory on a small GPU; the loss and gradient are the same).
    * ``tv_weight`` / ``nps_weight``: regulariser weights (loss units; Sharif used 3 and 5 on a
      softmax loss, AdvHat 1e-4 TV on cosine similarity); ``nps_variant``: "product" | "min".
    * ``early_stop``: stop once all draws of ``early_stop_patience`` consecutive steps succeed.
    * ``amp``: bf16 autocast for the model's forward/backward on CUDA (the patch itself stays float32;
      evaluation is always float32).
    """

    steps: int = 300
    step_size: float = 2.0 / 255.0
    optimizer: str = "sign"
    momentum: float = 0.9
    eot_samples: int = 8
    eot_batch: int | None = None
    tv_weight: float = 0.0
    nps_weight: float = 0.0
    nps_variant: str = "product"
    variation: PhysicalVariation = field(default_factory=PhysicalVariation.identity)
    seed: int = 0
    early_stop: bool = True
    early_stop_patience: int = 10
    amp: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.variation, dict):
            self.variation = PhysicalVariation.from_dict(self.variation)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"patch optimizer {self.optimizer!r} is unknown; valid: {list(OPTIMIZERS)}")
        if self.nps_variant not in NPS_VARIANTS:
            raise ConfigError(
                f"patch nps_variant {self.nps_variant!r} is unknown; valid: {list(NPS_VARIANTS)}"
            )
        if int(self.steps) < 1 or int(self.eot_samples) < 1 or int(self.early_stop_patience) < 1:
            raise ConfigError("patch steps, eot_samples and early_stop_patience must be >= 1")
        if self.eot_batch is not None and int(self.eot_batch) < 1:
            raise ConfigError(f"patch eot_batch={self.eot_batch} must be >= 1 (or None: all draws at once)")
        if not self.step_size > 0:
            raise ConfigError(f"patch step_size={self.step_size} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"patch momentum={self.momentum} must be in [0, 1)")
        if self.tv_weight < 0 or self.nps_weight < 0:
            raise ConfigError("patch tv_weight and nps_weight must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (for logs and reports)."""
        return asdict(self)


@dataclass
class PatchResult:
    """An optimised patch [3, H, W] in [0, 1] (0 outside ``mask``) and how it was found."""

    patch: Tensor
    mask: Tensor
    history: list[float]  # mean total loss per step
    success_history: list[float]  # fraction of the step's draws that succeeded (empty without)
    steps: int
    seconds: float
    settings: PatchSettings
    initial: Tensor

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / max(self.steps, 1)


def initial_patch(
    mask: Tensor, init: str | Tensor = "random", generator: torch.Generator | None = None
) -> Tensor:
    """The starting patch [3, H, W]: uniform noise, mid-grey, or a given tensor; 0 outside the mask."""
    m = mask.reshape(1, *mask.shape[-2:])
    if isinstance(init, Tensor):
        start = init.reshape(3, *mask.shape[-2:]).to(m.device, torch.float32).clamp(0.0, 1.0)
    elif init == "random":
        dev = generator.device if generator is not None else m.device
        start = torch.rand((3, *mask.shape[-2:]), generator=generator, device=dev).to(m.device)
    elif init == "grey":
        start = torch.full((3, *mask.shape[-2:]), 0.5, device=m.device)
    else:
        raise ConfigError(f"patch init {init!r} is unknown; valid: {list(INITS)} or a [3, H, W] tensor")
    return start * m


@contextlib.contextmanager
def frozen_modules(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every module in eval mode with frozen parameters for the block, then restored.

    Why: a patch (or its evaluation) must neither update BatchNorm statistics nor accumulate
    parameter gradients in the networks it attacks; the study evaluates under the same guard.
    """
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(attack_mode(module))
        yield


@dataclass(frozen=True)
class ModelLoss:
    """A patch loss together with the networks it runs.

    Why: :func:`optimise_patch` freezes those networks while it optimises; a loss that names its
    models lets a caller pass the loss alone. Called like the plain function it wraps.
    """

    fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    modules: tuple[nn.Module, ...]

    def __call__(self, x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.fn(x_adv, index)


def _check_faces(faces: Tensor) -> None:
    """The engine's input contract: RGB [K, 3, H, W], finite, in [0, 1]."""
    if faces.dim() != 4 or faces.shape[1] != 3:
        raise ConfigError(f"faces must be [K, 3, H, W] RGB in [0, 1], got {tuple(faces.shape)}")
    if not bool(torch.isfinite(faces).all()) or float(faces.min()) < 0.0 or float(faces.max()) > 1.0:
        raise ConfigError("faces must be finite and in [0, 1] (divide uint8 by 255)")


def _modules_to_freeze(loss_fn: LossFn, modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The caller's ``modules`` and the loss's own (``loss_fn.modules``), each once, in that order."""
    unique = {id(m): m for m in [*modules, *getattr(loss_fn, "modules", ())]}
    return list(unique.values())


def _eot_loss(
    loss_fn: LossFn, faces: Tensor, patch: Tensor, mask: Tensor, draws: Draws, settings: PatchSettings
) -> tuple[Tensor, Tensor | None]:
    """The loss [n] of one batch of draws (each on its paired photo) and, if the loss reports it, success."""
    device = faces.device
    index = draws.face_index.to(device)
    x_adv = apply_patch(faces.index_select(0, index), patch, mask, draws.to(device), settings.variation)
    with autocast_for(device, settings.amp):
        out = loss_fn(x_adv, index)
    return out if isinstance(out, tuple) else (out, None)


def _regularised(loss: Tensor, patch: Tensor, region: MaskRegion, settings: PatchSettings) -> Tensor:
    """``loss`` plus the TV and NPS terms whose weights are switched on."""
    total = loss
    if settings.tv_weight > 0:
        total = total + settings.tv_weight * total_variation(patch, region.mask, region=region)
    if settings.nps_weight > 0:
        nps = non_printability_score(patch, region.mask, variant=settings.nps_variant, region=region)
        total = total + settings.nps_weight * nps
    return total


@dataclass
class _Step:
    """One step's objective (mean loss + penalties, detached), its gradient, and per-draw success."""

    total: Tensor
    grad: Tensor
    success: Tensor | None


def _step(
    loss_fn: LossFn,
    faces: Tensor,
    patch: Tensor,
    mask: Tensor,
    region: MaskRegion,
    draws: Draws,
    settings: PatchSettings,
) -> _Step:
    """The objective and its gradient over all of a step's draws, ``settings.eot_batch`` per pass.

    Why chunks: a pass keeps the activations of all its draws for the backward; a chunk's share of
    the mean is differentiated on its own and the gradients summed, so only one chunk's graph lives
    at a time while objective and gradient stay those of the whole batch (up to float rounding).
    The penalties ride on the first chunk. With one chunk this is exactly mean + penalties.
    """
    n = len(draws)
    chunk = min(int(settings.eot_batch or n), n)
    total, grad, successes = patch.new_zeros(()), torch.zeros_like(patch), []
    for start in range(0, n, chunk):
        if chunk == n:
            part = draws
        else:  # the index on the draws' device: a host-made one would be copied over every chunk
            part = draws.select(torch.arange(start, min(start + chunk, n), device=draws.face_index.device))
        loss, success = _eot_loss(loss_fn, faces, patch, mask, part, settings)
        share = loss.float().mean() * (loss.shape[0] / n)
        if start == 0:
            share = _regularised(share, patch, region, settings)
        (g,) = torch.autograd.grad(share, patch)
        total, grad = total + share.detach(), grad + g
        if success is not None:
            successes.append(success)
    return _Step(total, grad, torch.cat(successes) if successes else None)


class _PatchUpdate:
    """One optimiser step on the mask's pixels: MI-FGSM's signed step with momentum, or Adam.

    Why a class: the momentum (velocity or Adam's moments) lives across steps; the mask projection
    after each step is what keeps the patch exactly 0 outside the mask.
    """

    def __init__(self, patch: Tensor, mask: Tensor, settings: PatchSettings) -> None:
        self.patch = patch
        self.mask = mask.reshape(1, *mask.shape[-2:])
        self.settings = settings
        self.adam = (
            torch.optim.Adam([patch], lr=settings.step_size, betas=(settings.momentum, 0.999))
            if (settings.optimizer == "adam")
            else None
        )
        self.velocity = torch.zeros_like(patch)

    @torch.no_grad()
    def __call__(self, grad: Tensor) -> None:
        grad = grad * self.mask
        if self.adam is None:
            # MI-FGSM: L1-normalised gradient into the velocity, then a signed step
            self.velocity.mul_(self.settings.momentum).add_(grad / grad.abs().mean().clamp_min(1e-12))
            self.patch.sub_(self.settings.step_size * self.velocity.sign())
        else:
            self.patch.grad = grad
            self.adam.step()
            self.patch.grad = None
        # only mask pixels are parameters; outside the mask the patch stays exactly 0
        self.patch.clamp_(0.0, 1.0).mul_(self.mask)


#: On a GPU, the histories are read back (and early stopping decided) every this many steps.
READ_EVERY = 10


def _read_every(device: torch.device) -> int:
    """Steps between reads of the progress: on the CPU a read costs nothing, so every step (and never
    a step past an early stop); elsewhere :data:`READ_EVERY`."""
    return 1 if device.type == "cpu" else READ_EVERY


class _Progress:
    """The loss and success histories, kept on the device and read back every ``read_every`` steps.

    Why: ``float(loss)`` every step makes the host wait for the device every step, which idles a GPU
    between steps. Early stopping still stops where a per-step check would: each step's "every draw
    of the last ``early_stop_patience`` steps succeeded" flag is computed on the device, the patch
    after each step is kept until the next read, and a stop found at a read rolls back to its step.
    """

    def __init__(self, settings: PatchSettings, read_every: int) -> None:
        self.settings = settings
        self.read_every = read_every
        self.losses: list[Tensor] = []
        self.rates: list[Tensor] = []
        self.streak: Tensor | None = None  # consecutive steps, up to now, on which every draw succeeded
        self.pending: list[tuple[Tensor, Tensor]] = []  # (stop flag, patch) of steps not yet read
        self.stopped_patch: Tensor | None = None

    def record(self, step: _Step, patch: Tensor) -> None:
        self.losses.append(step.total)
        if step.success is None:
            return
        self.rates.append(step.success.float().mean())
        if self.settings.early_stop:
            every = step.success.all().long()
            self.streak = every if self.streak is None else (self.streak + 1) * every
            self.pending.append((self.streak >= self.settings.early_stop_patience, patch.detach().clone()))

    def should_stop(self, last: bool = False) -> bool:
        """At a read (every ``read_every`` steps, or ``last``): did a step meet the early stop? Then
        the histories end at that step and :attr:`stopped_patch` is the patch after it."""
        if not self.pending or not (last or len(self.pending) >= self.read_every):
            return False
        flags = torch.stack([flag for flag, _ in self.pending]).tolist()
        pending, self.pending = self.pending, []
        if True not in flags:
            return False
        stop = flags.index(True)
        extra = len(flags) - 1 - stop  # steps run after the stop
        self.losses = self.losses[: len(self.losses) - extra]
        self.rates = self.rates[: len(self.rates) - extra]
        self.stopped_patch = pending[stop][1]
        return True

    def histories(self) -> tuple[list[float], list[float]]:
        """(mean total loss, success rate) per step as floats: one read for the whole optimisation."""
        losses = torch.stack(self.losses).tolist() if self.losses else []
        rates = torch.stack(self.rates).tolist() if self.rates else []
        return losses, rates


def optimise_patch(
    loss_fn: LossFn,
    faces: Tensor,
    mask: Tensor,
    settings: PatchSettings | None = None,
    init: str | Tensor = "random",
    *,
    modules: Iterable[nn.Module] = (),
) -> PatchResult:
    """Optimise one (universal) patch for the photos ``faces`` [K, 3, H, W] in [0, 1].

    ``modules``: the networks ``loss_fn`` runs (eval mode + frozen parameters while optimising,
    restored afterwards, and it is verified that no parameter gradient was accumulated); the losses
    built here (``classifier_patch_loss``, the face losses) carry their model in ``loss_fn.modules``,
    which is added automatically.
    """
    settings = settings or PatchSettings()
    _check_faces(faces)
    device = faces.device
    size = image_size(faces)
    mask = check_mask(mask, size).to(device)
    region = MaskRegion.of(mask)
    generator = draw_generator(settings.seed, "optimise", device)
    start_patch = initial_patch(mask, init, generator)
    patch = start_patch.clone().requires_grad_(True)
    update = _PatchUpdate(patch, mask, settings)
    progress = _Progress(settings, _read_every(device))
    start = time.perf_counter()
    with frozen_modules(_modules_to_freeze(loss_fn, modules)):
        for index in range(settings.steps):
            draws = settings.variation.sample(settings.eot_samples, generator, size, faces.shape[0])
            step = _step(loss_fn, faces, patch, mask, region, draws, settings)
            update(step.grad)
            progress.record(step, patch)
            if progress.should_stop(last=index == settings.steps - 1):
                break
    result = progress.stopped_patch if progress.stopped_patch is not None else patch.detach()
    history, success_history = progress.histories()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return PatchResult(
        patch=result,
        mask=mask,
        history=history,
        success_history=success_history,
        steps=len(history),
        seconds=time.perf_counter() - start,
        settings=settings,
        initial=start_patch.detach(),
    )


def classifier_patch_loss(model: nn.Module, y: Tensor, target: int | Tensor | None = None) -> LossFn:
    """Brown et al.'s patch loss for any robustcnn classifier (raw [0, 1] images in, logits out).

    ``y`` [K]: the true labels of the K images the patch is optimised on. Untargeted: maximise the
    cross-entropy of the true label (success: the prediction changes); targeted: minimise the
    cross-entropy of ``target`` (an int for a universal "toaster" patch, or [K]; success: prediction
    == target). Use with ``optimise_patch(loss, images, mask, settings)`` (the model is frozen for you).
    """
    labels = y.long()
    goal = None
    if target is not None:
        goal = torch.as_tensor(target, device=labels.device).long().expand_as(labels)

    def loss(x_adv: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x_adv).float()
        true = labels.to(logits.device).index_select(0, index)
        if goal is None:
            return -F.cross_entropy(logits, true, reduction="none"), logits.argmax(1) != true
        wanted = goal.to(logits.device).index_select(0, index)
        return F.cross_entropy(logits, wanted, reduction="none"), logits.argmax(1) == wanted

    return ModelLoss(loss, (model,))
