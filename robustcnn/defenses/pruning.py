"""Pruning as a post-hoc transform: zero weights or channels, optionally fine-tune, then fold.

Why it is here although it is no defense by itself: pruning a naturally trained network gives no
robustness, while pruning an adversarially trained one (``defense.base=pgd_at``) with adversarial
fine-tuning keeps most of it at moderate sparsity (Ye et al. 2019; HYDRA, Sehwag et al. 2020). The
toolkit measures exactly that trade-off, so the pruned model must be a real one: pruned weights
stay exactly zero through fine-tuning (masks re-applied after every optimizer step), the masks are
folded into the weights (the state dict has a fresh model's keys), and channel pruning of plain
conv chains rebuilds a physically smaller network (:mod:`robustcnn.defenses.shrink`) whose size
and CPU latency are reported next to the dense model's.

Methods: ``magnitude_global`` zeroes the ``sparsity`` fraction of smallest-|w| weights over all
conv and linear weights at once (Han et al. 2015; "LWM" in HYDRA); ``l1_structured`` removes, in
every conv layer, the ``sparsity`` fraction of output channels with the smallest L1 norm (Li et al.
2017), never the channels of a conv that outputs the logits.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from robustcnn.defenses.base import Defense, JobFit, register_defense
from robustcnn.defenses.shrink import (
    ConvUnit,
    conv_units,
    find_chain,
    output_layer_name,
    outputs_match,
    shrink_chain,
    shrink_to_counts,
)
from robustcnn.errors import ConfigError
from robustcnn.models import Classifier
from robustcnn.training.loop import TrainContext, TrainHook

METHODS = ("magnitude_global", "l1_structured")
SCHEDULES = ("one_shot", "iterative")
FINETUNES = ("none", "clean", "adversarial")
#: CPU latency is measured on this batch size, best of this many timed passes (after one warm-up).
LATENCY_BATCH = 256
LATENCY_REPEATS = 3
#: Images used to verify that the shrunk model reproduces the masked one.
CHECK_IMAGES = 64


class Masks:
    """Boolean keep-masks by parameter name; :meth:`apply` zeroes the pruned entries in place."""

    def __init__(self, masks: Mapping[str, Tensor] | None = None) -> None:
        self.masks: dict[str, Tensor] = dict(masks or {})
        self._params: list[tuple[nn.Parameter, Tensor]] | None = None

    def bind(self, model: nn.Module) -> None:
        """Resolve names to parameters once (and masks to their devices) for per-step use."""
        params = dict(model.named_parameters())
        self._params = [(params[n], m.to(params[n].device)) for n, m in self.masks.items()]

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        if model is not None or self._params is None:
            assert model is not None, "bind() a model first"
            self.bind(model)
        for param, keep in self._params or []:
            param.masked_fill_(~keep, 0.0)


class MaskHook(TrainHook):
    """Keeps pruned weights at exactly zero while fine-tuning: re-applies the masks after every
    optimizer step (a step-post hook on the loop's optimizer), so no optimizer (Adam's moments,
    SGD momentum, weight decay) can regrow them."""

    def __init__(self, masks: Masks) -> None:
        self.masks = masks
        self._handle: RemovableHandle | None = None

    def on_fit_start(self, ctx: TrainContext) -> None:
        self.masks.apply(ctx.model)  # binds to the parameters on the training device
        self._handle = ctx.optimizer.register_step_post_hook(lambda *_: self.masks.apply())

    def on_fit_end(self, ctx: TrainContext) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.masks.apply(ctx.model)


def prunable_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The weights pruning counts: every Conv2d and Linear weight, by parameter name."""
    return [
        (f"{name}.weight" if name else "weight", m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]


def magnitude_masks(model: nn.Module, sparsity: float, previous: Masks) -> Masks:
    """Keep-masks zeroing the ``sparsity`` fraction of smallest-|w| weights across all layers.

    Already-pruned weights score -1, so an iterative schedule only ever adds to the pruned set.
    """
    weights = prunable_weights(model)
    scores = []
    for name, w in weights:
        score = w.detach().abs().flatten().float()
        if name in previous.masks:
            score = score.masked_fill(~previous.masks[name].to(score.device).flatten(), -1.0)
        scores.append(score)
    flat = torch.cat(scores)
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    masks: dict[str, Tensor] = {}
    start = 0
    for name, w in weights:
        masks[name] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return Masks(masks)


def structured_units(model: nn.Module) -> list[ConvUnit]:
    """Conv layers whose output channels may be pruned (all but a conv that produces the logits)."""
    last = output_layer_name(model)
    return [u for u in conv_units(model) if u.conv_name != last]


def channel_masks(
    model: nn.Module, sparsity: float, previous: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Masks]:
    """Per conv layer, drop the ``sparsity`` fraction of output channels of smallest L1 norm
    (at least one channel is kept); returns the channel keep-masks and the parameter masks.

    A pruned channel's conv weights and bias and its batch norm's scale and shift are all zeroed,
    so the channel outputs exactly zero (a BN shift alone would keep it alive).
    """
    kept: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for unit in structured_units(model):
        conv = unit.conv
        n = conv.out_channels
        score = conv.weight.detach().abs().flatten(1).sum(1).float()
        if unit.conv_name in previous:
            score = score.masked_fill(~previous[unit.conv_name].to(score.device), -1.0)
        k = min(int(round(sparsity * n)), n - 1)
        keep = torch.ones(n, dtype=torch.bool, device=score.device)
        if k > 0:
            keep[torch.topk(score, k, largest=False, sorted=False).indices] = False
        kept[unit.conv_name] = keep
        masks[f"{unit.conv_name}.weight"] = keep.view(-1, 1, 1, 1).expand_as(conv.weight)
        if conv.bias is not None:
            masks[f"{unit.conv_name}.bias"] = keep
        if unit.bn is not None and unit.bn.affine:
            masks[f"{unit.bn_name}.weight"] = keep
            masks[f"{unit.bn_name}.bias"] = keep
    return kept, Masks(masks)


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as a safetensors file (the cache's format)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return len(safetensors_bytes(state))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Best-of-3 CPU wall time (ms) of one eval forward pass on a batch of 256 images."""
    probe = copy.deepcopy(model).to("cpu").eval()
    x = torch.rand((LATENCY_BATCH, *input_shape), generator=torch.Generator().manual_seed(0))
    probe(x)  # warm-up (allocator, kernel selection)
    best = math.inf
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        probe(x)
        best = min(best, time.perf_counter() - start)
    return best * 1000.0


def _epoch_split(total: int, parts: int) -> list[int]:
    """``total`` epochs in ``parts`` integer shares that add up exactly (later shares get the rest)."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


@register_defense("prune")
class PruneDefense(Defense):
    """Post-hoc pruning (magnitude or L1-channel) with optional clean/adversarial fine-tuning."""

    def __init__(
        self,
        *,
        method: str = "magnitude_global",
        sparsity: float = 0.5,
        schedule: str = "one_shot",
        iterations: int = 3,
        finetune: str = "clean",
        finetune_epochs: int = 1,
        finetune_eps: float = 0.3,
        finetune_steps: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ConfigError(f"defense.method={method!r} is unknown; choose one of {', '.join(METHODS)}")
        if (
            isinstance(sparsity, bool)
            or not isinstance(sparsity, int | float)
            or not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0)
        ):
            raise ConfigError(
                f"defense.sparsity={sparsity!r} must be a fraction in [0, 1) (e.g. 0.5 prunes half the "
                "weights/channels; 1 would remove everything)"
            )
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"defense.schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}"
            )
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"defense.iterations={iterations!r} must be an integer >= 1 (pruning steps)")
        if finetune not in FINETUNES:
            raise ConfigError(
                f"defense.finetune={finetune!r} is unknown; choose one of {', '.join(FINETUNES)}"
            )
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise ConfigError(
                f"defense.finetune_epochs={finetune_epochs!r} must be an integer >= 0 (0: no fine-tuning)"
            )
        if (
            isinstance(finetune_eps, bool)
            or not isinstance(finetune_eps, int | float)
            or not 0 < finetune_eps <= 1
        ):
            raise ConfigError(
                f"defense.finetune_eps={finetune_eps!r} must be in (0, 1]: an L-inf radius in pixel units "
                "(e.g. 0.3 for MNIST, 8/255 = 0.0314 for CIFAR-10)"
            )
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 1:
            raise ConfigError(
                f"defense.finetune_steps={finetune_steps!r} must be an integer >= 1 (PGD steps)"
            )
        self.method = method
        self.sparsity = float(sparsity)
        self.schedule = schedule
        self.iterations = iterations
        self.finetune = finetune
        self.finetune_epochs = finetune_epochs
        self.finetune_eps = float(finetune_eps)
        self.finetune_steps = finetune_steps
        self._report: dict[str, Any] = {}

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "method": self.method,
            "sparsity": self.sparsity,
            "schedule": self.schedule,
            "iterations": self.iterations,
            "finetune": self.finetune,
            "finetune_epochs": self.finetune_epochs,
            "finetune_eps": self.finetune_eps,
            "finetune_steps": self.finetune_steps,
        }

    def _finetune_hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        if self.finetune != "adversarial":
            return []
        from robustcnn.defenses import adversarial_training  # noqa: F401  (registers "pgd_at")
        from robustcnn.defenses.base import build_defense

        at = build_defense({"name": "pgd_at", "eps": self.finetune_eps, "steps": self.finetune_steps})
        return list(at.hooks(seed, x_train, y_train))

    def post_train(
        self,
        model: nn.Module,
        x_train: Tensor,
        y_train: Tensor,
        device: torch.device,
        fit: JobFit,
        seed: int,
    ) -> dict[str, Any]:
        """Prune ``model`` in place (fine-tuning between steps), fold the masks, shrink if possible."""
        structured = self.method == "l1_structured"
        if structured and not structured_units(model):
            raise ConfigError(
                "defense.method=l1_structured needs conv layers to prune; this model has none "
                "(use method=magnitude_global)"
            )
        input_shape = tuple(getattr(model, "input_shape", x_train.shape[1:]))
        prunable_before = sum(w.numel() for _, w in prunable_weights(model))
        report: dict[str, Any] = {
            **{k: v for k, v in self.params().items() if k != "base"},
            "target_sparsity": self.sparsity,
            "params_before": count_params(model),
            "nonzero_params_before": count_nonzero(model),
            "state_dict_bytes_before": state_dict_bytes(model),
        }
        # Latency can only change when channels are physically removed (dense kernels multiply the
        # zeros of unstructured sparsity just the same), so it is timed only then: it costs seconds.
        timed = structured and find_chain(model)[0] is not None
        if timed:
            report["cpu_latency_ms_before"] = cpu_latency_ms(model, input_shape)
        steps = self.iterations if self.schedule == "iterative" else 1
        epochs = _epoch_split(self.finetune_epochs if self.finetune != "none" else 0, steps)
        hooks = self._finetune_hooks(seed, x_train, y_train) if any(epochs) else []
        masks = Masks()
        kept: dict[str, Tensor] = {}
        history: list[dict[str, float]] = []
        for step in range(steps):
            target = self.sparsity * (step + 1) / steps
            if structured:
                kept, masks = channel_masks(model, target, kept)
            else:
                masks = magnitude_masks(model, target, masks)
            masks.apply(model)
            if epochs[step] > 0:
                # masks last: their end-of-fit re-application runs after any checkpoint restore
                result = fit(model, hooks=[*hooks, MaskHook(masks)], epochs=epochs[step])
                history += list(getattr(result, "history", []) or [])
        masks.apply(model)  # folded: plain weights with exact zeros, no extra state-dict entries
        if history:
            report["finetune_final_train_loss"] = history[-1].get("train_loss")
        for hook in hooks:  # e.g. the adversarial hook's training robust accuracy
            summary = getattr(hook, "summary", None)
            if callable(summary):
                report.update({f"finetune_{k}": v for k, v in summary().items()})
        if structured:
            report.update(self._shrink(model, kept, x_train))
        prunable_nonzero = sum(int(torch.count_nonzero(w.detach())) for _, w in prunable_weights(model))
        report.update(
            {
                # zero or removed weights, over the conv+linear weights of the unpruned architecture
                "sparsity": 1.0 - prunable_nonzero / max(prunable_before, 1),
                "prunable_weights": prunable_before,
                "params_after": count_params(model),
                "nonzero_params_after": count_nonzero(model),
                "state_dict_bytes_after": state_dict_bytes(model),
            }
        )
        if timed:
            report["cpu_latency_ms_after"] = cpu_latency_ms(model, input_shape)
        self._report = report
        return report

    def _shrink(self, model: nn.Module, kept: Mapping[str, Tensor], x_train: Tensor) -> dict[str, Any]:
        """Rebuild a plain conv chain with only the kept channels; verify it against the masked model."""
        counts = {name: int(keep.sum()) for name, keep in kept.items()}
        before = {u.conv_name: u.conv.out_channels for u in structured_units(model)}
        out: dict[str, Any] = {
            "channels_before": before,
            "kept_channels": counts,
            "channel_sparsity": 1.0 - sum(counts.values()) / max(sum(before.values()), 1),
            "shrunk": False,
        }
        chain, reason = find_chain(model)
        if chain is not None and set(kept) != {u.conv_name for u in chain.convs}:
            chain, reason = None, "a conv of the chain produces the logits"
        if chain is None:
            out["shrink_note"] = (
                f"physical shrinking is not supported for this architecture ({reason}); "
                "pruned channels are kept as zeros"
            )
            return out
        reference = copy.deepcopy(model)  # the masked full-size model, to verify against
        shrink_chain(model, chain, {name: keep.nonzero().flatten() for name, keep in kept.items()})
        device = next(model.parameters()).device
        ok, diff = outputs_match(reference, model, x_train[:CHECK_IMAGES].to(device))
        if not ok:
            for name, child in reference.named_children():  # undo: put the masked layers back
                setattr(model, name, child)
            out["shrink_note"] = (
                f"the shrunk network's outputs differ from the masked one's (max |diff| {diff:.3g}): "
                "its forward pass is not a plain chain in layer order; pruned channels are kept as zeros"
            )
            return out
        out.update({"shrunk": True, "shrink_max_abs_diff": diff})
        return out

    def prepare_for_load(self, model: Classifier, report: Mapping[str, Any]) -> Classifier:
        """Rebuild the smaller architecture recorded in ``report`` so the cached weights load strictly."""
        if report.get("shrunk"):
            shrink_to_counts(model, report["kept_channels"])
        return model

    def report(self) -> dict[str, Any]:
        return dict(self._report)
