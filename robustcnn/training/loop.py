"""The one training loop. Defenses plug into it through :class:`TrainHook`, never by copying it.

Why a hook object rather than subclasses or callbacks-by-name: a defense needs exactly three
things from the loop: to replace the loss of a batch (adversarial training, TRADES), to react at
epoch ends (catastrophic-overfitting detection, checkpoint choice) and to set things up or tear
them down around the fit. Everything else (optimizer, schedule, device placement, bf16 autocast
and channels_last on CUDA, timing) is the same for every defense and lives here once.
Data stay on the device as whole tensors: no DataLoader and no numpy in the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.batching import autocast_for, is_out_of_memory, out_of_memory_error, release_cached_memory
from robustcnn.config import config_bool, config_float, config_int, config_section
from robustcnn.errors import ConfigError
from robustcnn.interrupts import raise_if_requested
from robustcnn.progress import progress_bar

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("none", "cosine", "step", "onecycle")
#: The settings of the ``training`` section and its sub-sections (anything else is a typo).
TRAINING_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "scheduler",
    "augment",
    "max_batches",
    "use_cache",
    "amp",
    "channels_last",
)
OPTIMIZER_KEYS = ("name", "lr", "weight_decay", "momentum", "nesterov")
SCHEDULER_KEYS = ("name", "step_size", "gamma")


@dataclass(frozen=True)
class TrainConfig:
    """Validated training settings (the ``training`` config group)."""

    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: Weight decay applied to the weights directly (AdamW, Loshchilov & Hutter 2019) rather than
    #: added to the gradient (L2 through the optimiser's adaptive scaling); set by ``defense=weight_decay``.
    decoupled_weight_decay: bool = False
    momentum: float = 0.9
    nesterov: bool = True
    scheduler: str = "cosine"
    step_size: int = 5
    gamma: float = 0.1
    max_batches: int | None = None
    amp: bool = True
    channels_last: bool = True
    #: Random translation by up to this many pixels (zero padding) per training image; 0 = off.
    shift: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> TrainConfig:
        """Build from the ``training`` config section: every value type-checked, named when wrong."""
        cfg = config_section(cfg, "training", TRAINING_KEYS)
        opt = config_section(cfg.get("optimizer"), "training.optimizer", OPTIMIZER_KEYS)
        sched = config_section(cfg.get("scheduler"), "training.scheduler", SCHEDULER_KEYS)
        augment = config_section(cfg.get("augment"), "training.augment", ("shift",))
        config_bool(cfg.get("use_cache", True), "training.use_cache")  # read by the runner
        max_batches = cfg.get("max_batches")
        config = cls(
            epochs=config_int(cfg.get("epochs", cls.epochs), "training.epochs"),
            batch_size=config_int(cfg.get("batch_size", cls.batch_size), "training.batch_size"),
            optimizer=str(opt.get("name", cls.optimizer)).lower(),
            lr=config_float(opt.get("lr", cls.lr), "training.optimizer.lr"),
            weight_decay=config_float(
                opt.get("weight_decay", cls.weight_decay), "training.optimizer.weight_decay"
            ),
            momentum=config_float(opt.get("momentum", cls.momentum), "training.optimizer.momentum"),
            nesterov=config_bool(opt.get("nesterov", cls.nesterov), "training.optimizer.nesterov"),
            scheduler=str(sched.get("name", cls.scheduler)).lower(),
            step_size=config_int(sched.get("step_size", cls.step_size), "training.scheduler.step_size"),
            gamma=config_float(sched.get("gamma", cls.gamma), "training.scheduler.gamma"),
            max_batches=None if max_batches is None else config_int(max_batches, "training.max_batches"),
            amp=config_bool(cfg.get("amp", cls.amp), "training.amp"),
            channels_last=config_bool(cfg.get("channels_last", cls.channels_last), "training.channels_last"),
            shift=config_int(augment.get("shift", cls.shift), "training.augment.shift"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"training.epochs={self.epochs} must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"training.batch_size={self.batch_size} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"training.optimizer.lr={self.lr} must be a positive number")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(
                f"training.optimizer.weight_decay={self.weight_decay} must be >= 0 (0 = no weight decay)"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(
                f"training.optimizer.momentum={self.momentum} must be in [0, 1) (SGD only; 0.9 is usual)"
            )
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(
                f"training.scheduler.gamma={self.gamma} must be a positive number (lr factor of step)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"training.optimizer.name={self.optimizer!r} is unknown; choose one of {OPTIMIZERS}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"training.scheduler.name={self.scheduler!r} is unknown; choose one of {SCHEDULERS}"
            )
        if self.decoupled_weight_decay and self.optimizer != "adam":
            raise ConfigError(
                f"decoupled weight decay needs training.optimizer.name=adam (AdamW), not {self.optimizer!r}; "
                "torch's SGD has only the coupled form (set defense.decoupled=false)"
            )
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"training.max_batches={self.max_batches} must be >= 1 or null")
        if self.shift < 0:
            raise ConfigError(f"training.augment.shift={self.shift} must be >= 0")
        if self.step_size < 1:
            raise ConfigError(f"training.scheduler.step_size={self.step_size} must be >= 1")


@dataclass
class TrainContext:
    """What hooks see and may change while the loop runs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    config: TrainConfig
    epoch: int = 0
    #: Global batch counter (0-based) and batches per epoch: for per-batch schedules (eps warm-up).
    step: int = 0
    steps_per_epoch: int = 1
    history: list[dict[str, float]] = field(default_factory=list)
    #: A hook sets this to end training after the current epoch (e.g. collapse detected).
    stop: bool = False
    #: Free-form notes a hook wants logged with the run (events, chosen checkpoint, ...).
    notes: dict[str, Any] = field(default_factory=dict)
    #: Images per forward/backward pass once the device ran out of memory (None: whole batches).
    piece_size: int | None = None
    #: The rows of the current batch that ``compute_loss`` sees: ``piece_start`` onwards, of a batch of
    #: ``batch_images`` (None: the whole batch, as when a hook is called outside the loop).
    piece_start: int = 0
    batch_images: int | None = None

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16 autocast on CUDA when enabled, a no-op elsewhere."""
        return autocast_for(self.device, self.config.amp)

    def piece_rows(self, x: Tensor) -> tuple[int, Tensor]:
        """(images in the whole batch, positions of ``x``'s rows in it), on ``x``'s device.

        Why: a hook that draws noise per image (a random start) must draw the same noise for an
        image whether the batch ran whole or in pieces after out-of-memory; it draws for the whole
        batch and keeps its piece's rows (``PerturbContext.random``).
        """
        n = x.shape[0]
        whole = self.batch_images if self.batch_images is not None else n
        return whole, torch.arange(self.piece_start, self.piece_start + n, device=x.device)


class TrainHook:
    """Override points for defenses; every method is optional."""

    def on_fit_start(self, ctx: TrainContext) -> None:
        """Called once before the first epoch."""

    def compute_loss(self, ctx: TrainContext, x: Tensor, y: Tensor) -> Tensor | None:
        """Return the loss of this batch, or None to leave it to the next hook / cross-entropy.

        The loss must be a mean over the images: after out-of-memory the loop calls this on pieces
        of the batch (:meth:`TrainContext.piece_rows` says which) and weights each by its share.
        """
        return None

    def penalty(self, ctx: TrainContext) -> Tensor | None:
        """A term on the weights alone (an L1 penalty), added to every batch's loss whichever hook made it.

        Why separate from :meth:`compute_loss`: only one hook supplies the loss, but a weight penalty
        composes with any loss (cross-entropy, adversarial, TRADES). Added once per batch: after
        out-of-memory the pieces' shares of it sum to one.
        """
        return None

    def batch_state(self) -> object:
        """What this hook has counted so far (e.g. correct predictions), for :meth:`restore_batch_state`.

        Why: a batch that runs out of memory part-way is redone in pieces, and what the failed
        attempt counted must not be counted twice. Hooks that count nothing per batch keep the default.
        """
        return None

    def restore_batch_state(self, state: object) -> None:
        """Go back to ``state`` (from :meth:`batch_state`): the batch is about to be redone."""

    def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        """Called after each epoch with that epoch's metrics (may add to them)."""

    def on_fit_end(self, ctx: TrainContext) -> None:
        """Called once after the last epoch."""


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    seconds: float
    images_per_s: float
    epochs_run: int
    notes: dict[str, Any]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(
        params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        decoupled_weight_decay=config.decoupled_weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-batch schedule (stepped every batch, so short runs still follow its shape)."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.step_size * steps_per_epoch, gamma=config.gamma
        )
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    return None


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random (dy, dx) in [-shift, shift], filling with zeros.

    One gather for the whole batch (no per-image loop), on the batch's device.
    """
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0].view(n, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)
    cols = offsets[1].view(n, 1, 1) + torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def fit(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    config: TrainConfig,
    device: torch.device,
    hooks: Sequence[TrainHook] = (),
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on whole in-memory tensors; returns the per-epoch history and timing.

    Hooks are called in their order: each at fit start, per batch until one returns a loss (none:
    cross-entropy), at each epoch end (after the loop's own metrics, before a hook's ``stop`` ends
    training) and at fit end.
    """
    _check_training_data(x_train, y_train)
    x_all, y_all = _to_training_device(model, x_train, y_train, config, device)
    steps = _batches_per_epoch(x_all.shape[0], config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    ctx = TrainContext(model=model, optimizer=optimizer, device=device, config=config, steps_per_epoch=steps)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    for hook in hooks:
        hook.on_fit_start(ctx)
    start = time.perf_counter()
    images_seen = 0
    for epoch in range(config.epochs):
        ctx.epoch = epoch
        metrics, seen = _train_epoch(ctx, hooks, x_all, y_all, scheduler, generator, progress)
        images_seen += seen
        for hook in hooks:
            hook.on_epoch_end(ctx, metrics)
        ctx.history.append(metrics)
        if ctx.stop:
            break
    for hook in hooks:
        hook.on_fit_end(ctx)
    optimizer.zero_grad(set_to_none=True)  # a trained model carries no stale gradients (or their memory)
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(
        history=ctx.history,
        seconds=seconds,
        images_per_s=images_seen / max(seconds, 1e-9),
        epochs_run=len(ctx.history),
        notes=ctx.notes,
    )


def _check_training_data(x_train: Tensor, y_train: Tensor) -> None:
    """Fail before anything is built: a mismatch or an empty split would fail later and less clearly."""
    if x_train.shape[0] != y_train.shape[0]:
        raise ConfigError(f"training data mismatch: {x_train.shape[0]} images but {y_train.shape[0]} labels")
    if x_train.shape[0] == 0:
        raise ConfigError("the training split is empty; check data.max_train or the dataset")


def _to_training_device(
    model: nn.Module, x_train: Tensor, y_train: Tensor, config: TrainConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Move the model and the whole training split to ``device`` once, so batches are mere indexing.

    On CUDA (when enabled) the model and images take the channels_last layout, which bf16
    convolutions run fastest in.
    """
    use_channels_last = config.channels_last and device.type == "cuda" and x_train.dim() == 4
    memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
    # torch's stubs leave out Module.to's memory_format keyword, which it accepts at run time
    model.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]
    x_all = x_train.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    y_all = y_train.to(device, non_blocking=True)
    return x_all, y_all


def _batches_per_epoch(n: int, config: TrainConfig) -> int:
    """Batches that cover ``n`` images (the last one may be short), at most ``max_batches``."""
    steps = math.ceil(n / config.batch_size)
    if config.max_batches is not None:
        steps = min(steps, config.max_batches)
    return steps


@dataclass
class _EpochTally:
    """An epoch's running sums, kept on the device: read once at its end, not synced per batch."""

    loss_sum: Tensor
    correct: Tensor
    seen: int = 0
    counted: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> _EpochTally:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))


def _train_epoch(
    ctx: TrainContext,
    hooks: Sequence[TrainHook],
    x_all: Tensor,
    y_all: Tensor,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    progress: bool,
) -> tuple[dict[str, float], int]:
    """One pass over the data in a fresh seeded order; returns the epoch's metrics and images seen.

    The order and the random shifts draw from ``generator`` alone, so a seed fixes the batches.
    """
    config, device = ctx.config, ctx.device
    ctx.model.train()
    order = torch.randperm(x_all.shape[0], generator=generator).to(device)
    tally = _EpochTally.zeros(device)
    epoch_start = time.perf_counter()
    bar = progress_bar(ctx.steps_per_epoch, f"epoch {ctx.epoch + 1}/{config.epochs}", progress)
    for step in range(ctx.steps_per_epoch):
        raise_if_requested()
        idx = order[step * config.batch_size : (step + 1) * config.batch_size]
        x, y = random_shift(x_all[idx], config.shift, generator), y_all[idx]
        loss = _train_step(ctx, hooks, x, y, tally)
        ctx.optimizer.step()
        if scheduler is not None:
            scheduler.step()  # per batch (see build_scheduler)
        ctx.step += 1
        tally.loss_sum += loss.detach() * y.shape[0]
        tally.seen += y.shape[0]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the epoch's time must include its queued kernels
    return _epoch_metrics(ctx, tally, time.perf_counter() - epoch_start), tally.seen


def _batch_loss(
    ctx: TrainContext, hooks: Sequence[TrainHook], x: Tensor, y: Tensor, tally: _EpochTally
) -> Tensor:
    """The first hook's loss for the batch, else cross-entropy, plus every hook's weight penalty.

    Penalties are built after the loss: an adversarial hook's inner attack freezes the parameters
    while it runs, and a penalty's graph must see them live.
    """
    loss = _data_loss(ctx, hooks, x, y, tally)
    penalties = [term for term in (hook.penalty(ctx) for hook in hooks) if term is not None]
    return loss + torch.stack(penalties).sum() if penalties else loss


def _data_loss(
    ctx: TrainContext, hooks: Sequence[TrainHook], x: Tensor, y: Tensor, tally: _EpochTally
) -> Tensor:
    """The first hook's loss for the batch, else cross-entropy, whose accuracy is counted here
    (hooks that replace the loss report their own accuracy, if any)."""
    for hook in hooks:
        loss = hook.compute_loss(ctx, x, y)
        if loss is not None:
            return loss
    with ctx.autocast():
        logits = ctx.model(x)
        loss = F.cross_entropy(logits.float(), y)
    # a new tensor, not in place: a batch redone after out-of-memory restores the previous one
    tally.correct = tally.correct + (logits.argmax(1) == y).sum()
    tally.counted += y.shape[0]
    return loss


def _train_step(
    ctx: TrainContext, hooks: Sequence[TrainHook], x: Tensor, y: Tensor, tally: _EpochTally
) -> Tensor:
    """The batch's gradients in the parameters' ``.grad`` (the caller steps); returns its mean loss.

    Why pieces: a batch size that fits one GPU can exhaust another's memory (or the same one's,
    fragmented, hours in), and losing the training to it is worse than running slower. The batch
    that ran out of memory is redone in halves, and later batches use the smaller size too. The
    gradients of the pieces, each weighted by its share of the batch, add up to the whole batch's
    for a mean loss, so the optimiser takes the same step; what the failed attempt counted is
    rolled back first. Exact but for BatchNorm in train mode (the warning says so) and for which
    dropout masks are drawn.
    """
    n = y.shape[0]
    saved = (tally.correct, tally.counted, [hook.batch_state() for hook in hooks])
    first_try: int | None = None
    while True:
        size = min(ctx.piece_size or n, n)
        try:
            loss = _accumulate_pieces(ctx, hooks, x, y, tally, size)
            break
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            if size == 1:
                raise out_of_memory_error("training", 1, "training.batch_size") from exc
        # outside the except block: the traceback, and the activations it holds, are released now
        tally.correct, tally.counted = saved[0], saved[1]
        for hook, state in zip(hooks, saved[2], strict=True):
            hook.restore_batch_state(state)
        first_try = first_try or size
        ctx.piece_size = size // 2
        release_cached_memory()
    if first_try is not None:
        _warn_smaller_pieces(ctx.model, first_try, size)
    return loss


def _accumulate_pieces(
    ctx: TrainContext, hooks: Sequence[TrainHook], x: Tensor, y: Tensor, tally: _EpochTally, size: int
) -> Tensor:
    """Forward and backward ``size`` images at a time; the summed gradients land in ``.grad`` at the end.

    ``torch.autograd.grad`` rather than ``backward``: a piece that runs out of memory half-way
    through its backward pass then leaves no partial gradient behind (and a hook that clears
    ``.grad`` before its inner attack cannot clear the earlier pieces' share).
    """
    params = [p for group in ctx.optimizer.param_groups for p in group["params"] if p.requires_grad]
    ctx.optimizer.zero_grad(set_to_none=True)
    n = y.shape[0]
    total: list[Tensor | None] = [None] * len(params)
    loss_sum: Tensor | None = None
    ctx.batch_images = n
    try:
        for begin in range(0, n, size):
            ctx.piece_start = begin
            piece_loss = _batch_loss(ctx, hooks, x[begin : begin + size], y[begin : begin + size], tally)
            share = min(size, n - begin) / n
            weighted = piece_loss if share == 1 else piece_loss * share
            grads = torch.autograd.grad(weighted, params, allow_unused=True)
            total = [g if t is None else t if g is None else t + g for t, g in zip(total, grads, strict=True)]
            loss_sum = weighted.detach() if loss_sum is None else loss_sum + weighted.detach()
    finally:
        ctx.piece_start, ctx.batch_images = 0, None
    for param, grad in zip(params, total, strict=True):
        param.grad = grad
    assert loss_sum is not None  # a batch has at least one image
    return loss_sum


def _warn_smaller_pieces(model: nn.Module, before: int, size: int) -> None:
    """Say once per change that the batch now runs in pieces, and whether the result is still exact."""
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    exact = (
        f"BatchNorm layers now normalise over {size} images instead of the whole batch, so the "
        f"weights differ slightly from a run that fits; set training.batch_size={size} or lower "
        "for a run any GPU repeats"
        if batch_norm
        else "gradients are summed over the pieces: the same steps, more passes; set "
        f"training.batch_size={size} or lower to avoid the retry"
    )
    log.warning(
        "training ran out of GPU memory with %d images at a time; each batch now runs in pieces of %d (%s)",
        before,
        size,
        exact,
    )


def _epoch_metrics(ctx: TrainContext, tally: _EpochTally, seconds: float) -> dict[str, float]:
    """The loop's own row of the history (hooks add theirs in ``on_epoch_end``)."""
    metrics = {
        "epoch": float(ctx.epoch + 1),
        "train_loss": float(tally.loss_sum.item() / max(tally.seen, 1)),
        "epoch_seconds": seconds,
        "train_images_per_s": tally.seen / max(seconds, 1e-9),
        "lr": float(ctx.optimizer.param_groups[0]["lr"]),
    }
    if tally.counted:  # batches that took the cross-entropy default
        metrics["train_accuracy"] = float(tally.correct.item() / tally.counted)
    if ctx.piece_size is not None:  # the run records that out-of-memory split its batches
        metrics["train_piece_images"] = float(ctx.piece_size)
    return metrics
