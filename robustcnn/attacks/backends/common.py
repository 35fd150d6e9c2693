"""What both library backends need so that a third-party attack obeys our base's contract.

A library attack is a black box that calls the model as it likes: it may switch train/eval mode,
zero the parameter gradients (ART), draw its random start from the *global* torch or numpy RNG,
and it never sees our forward/gradient counters or the AMP setting. These helpers put a fence
around one library call so that, from the outside, it behaves like a native ``perturb``:
counted, autocast like the native attacks, reproducible from ``attack.seed``, and with the model
and the caller's RNG state exactly as they were before.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from robustcnn.attacks.context import PerturbContext
from robustcnn.errors import ConfigError


def check_installed(module: str, install: str, backend: str) -> None:
    """Fail at construction (config time) when the library is missing, without importing it.

    ``find_spec`` only locates the package, so building an attack stays cheap; the slow import
    happens on the first ``perturb``.
    """
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"attack.backend={backend} needs the {module} package, which is not installed; "
            f"run `{install}` or use attack.backend=native"
        )


def import_library(module: str, install: str, backend: str) -> ModuleType:
    """Import a backend library lazily (torchattacks takes ~4 s, ART ~10 s to import)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"attack.backend={backend} needs the {module} package ({exc}); "
            f"run `{install}` or use attack.backend=native"
        ) from exc


def backend_seed(seed: int, ctx: PerturbContext, stream: int) -> int:
    """A seed fixed by (attack seed, batch, eps, restart), like :meth:`PerturbContext.random`.

    Libraries draw their random start from the global RNG for the whole batch they get, so unlike
    the native attacks the noise of one sample depends on which other samples are attacked (with
    ``early_stop`` the batch shrinks as eps grows): results are reproducible, but early_stop on/off
    can differ by sampling noise.
    """
    # only ints: their hash is the same in every process (str hashing is salted per process)
    return hash((seed, ctx.batch_index, ctx.eps_index, stream, 7_777)) & 0x7FFF_FFFF


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global torch (CPU + this CUDA device) and numpy RNGs; restore them afterwards.

    Restoring matters as much as seeding: the caller's random stream (training, data order) must
    not depend on whether an evaluation ran a library attack in between.
    """
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Give the model back exactly as the library got it: per-module modes, requires_grad, .grad.

    ART's ``loss_gradient`` calls ``model.zero_grad()``, which sets every parameter's ``.grad`` to
    None; without this, a freshly trained model (whose last optimizer step left gradients) would
    trip the base's "an attack accumulated gradients" check. Modes are restored per module, so a
    model that deliberately keeps some layer in another mode is restored as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` the current CUDA device: ART puts its estimator on the *current* one."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


class CountedLogits(nn.Module):
    """The model as the library sees it: counted, autocast as configured, float32 logits.

    * counters: every forward is counted, and a forward whose input requires grad as a gradient
      pass, so ``forward_passes`` / ``gradient_passes`` stay comparable with the native attacks;
    * ``attack.amp``: the forward runs under the same autocast as the native attacks and returns
      float32 (ART turns outputs into numpy, which has no bfloat16);
    * mode: the wrapper's own ``training`` flag copies the model's, because torchattacks reads
      ``model.training`` before an attack and calls ``model.train()`` afterwards if it was set.
    """

    def __init__(self, model: nn.Module, ctx: PerturbContext) -> None:
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.training = model.training

    def forward(self, x: Tensor) -> Tensor:
        self.ctx.counters["forward"] += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.ctx.counters["gradient"] += x.shape[0]
        with self.ctx.autocast():
            return self.model(x).float()


def number_of_classes(model: nn.Module, x: Tensor, ctx: PerturbContext) -> int:
    """The model's declared class count, else the width of its logits (the base checked they agree)."""
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int):
        return declared
    return int(ctx.logits(model, x[:1]).shape[1])
